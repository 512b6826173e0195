//! Sending an update's chunks (those the aggregator asked for after accepting the manifest)
//! in a task of its own, so the event loop
//! keeps answering while a slow upload runs, optionally paced to `upload_max_bytes_per_sec`.
//!
//! Pacing is for robots on thin uplinks (LTE, shared Wi-Fi): publishing a whole update at once
//! fills the link's buffers and starves everything else on it (teleoperation, telemetry) for as
//! long as the burst lasts. With a rate `R`, the publish of a payload waits until the bytes
//! already published (this upload's, payloads only) would have taken `sent / R` seconds; the
//! first chunk goes at once, and the whole upload takes about `total / R`.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

/// When each payload of an upload may go, for a rate in bytes per second (0: no limit).
#[derive(Debug, Clone)]
pub struct Pacer {
    bytes_per_sec: u64,
    sent: u64,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            bytes_per_sec,
            sent: 0,
        }
    }

    /// Offset from the upload's start at which a payload of `len` bytes may be published
    /// (the bytes before it at the configured rate), and counts it as sent.
    pub fn next(&mut self, len: usize) -> Duration {
        let due = if self.bytes_per_sec == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(self.sent as f64 / self.bytes_per_sec as f64)
        };
        self.sent = self.sent.saturating_add(len as u64);
        due
    }
}

/// One upload: some chunks of an update (all of them, or those the aggregator asked again
/// for).
#[derive(Debug, Clone)]
pub struct Upload {
    /// Which upload this is (the agent's counter): its `Uploaded` report names it, so a report
    /// from an upload already replaced by a resend is not mistaken for the current one's.
    pub id: u64,
    pub round: u64,
    /// (topic, chunk index) in publish order.
    pub chunks: Vec<(String, u32)>,
    /// The whole encoded update; chunk `i` is `blob[i·chunk_size ..]`, published as a slice of
    /// it (no copy). Indices beyond the blob are skipped.
    pub blob: Bytes,
    pub chunk_size: usize,
}

impl Upload {
    /// Chunk `i` of the blob, if the blob has one.
    pub fn chunk(&self, i: u32) -> Option<Bytes> {
        let start = (i as usize).checked_mul(self.chunk_size.max(1))?;
        (start < self.blob.len()).then(|| {
            self.blob
                .slice(start..(start + self.chunk_size.max(1)).min(self.blob.len()))
        })
    }
}

/// Publishes `up` through `publish(topic, payload)`, paced to `bytes_per_sec` (0: no limit).
/// Returns the payload bytes handed to `publish`.
pub async fn send<F, Fut>(up: Upload, bytes_per_sec: u64, mut publish: F) -> u64
where
    F: FnMut(String, Bytes) -> Fut,
    Fut: Future<Output = ()>,
{
    let start = tokio::time::Instant::now();
    let mut pacer = Pacer::new(bytes_per_sec);
    let mut total = 0u64;
    for (topic, i) in &up.chunks {
        let Some(c) = up.chunk(*i) else {
            continue;
        };
        tokio::time::sleep_until(start + pacer.next(c.len())).await;
        total += c.len() as u64;
        publish(topic.clone(), c).await;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    #[test]
    fn pacer_spaces_payloads_by_the_bytes_before_them() {
        let mut p = Pacer::new(1000);
        assert_eq!(p.next(500), Duration::ZERO);
        assert_eq!(p.next(500), Duration::from_millis(500));
        assert_eq!(p.next(2000), Duration::from_millis(1000));
        assert_eq!(p.next(1), Duration::from_millis(3000));
        let mut unlimited = Pacer::new(0);
        for _ in 0..3 {
            assert_eq!(unlimited.next(1 << 20), Duration::ZERO);
        }
    }

    fn upload(n: usize, len: usize) -> Upload {
        let blob: Vec<u8> = (0..n).flat_map(|i| vec![i as u8; len]).collect();
        Upload {
            id: 1,
            round: 1,
            chunks: (0..n as u32).map(|i| (format!("c/{i}"), i)).collect(),
            blob: blob.into(),
            chunk_size: len,
        }
    }

    #[test]
    fn chunks_are_slices_of_the_blob() {
        let mut up = upload(3, 4);
        up.blob = Bytes::from((0u8..10).collect::<Vec<_>>());
        assert_eq!(up.chunk(0).unwrap(), &[0, 1, 2, 3][..]);
        assert_eq!(up.chunk(2).unwrap(), &[8, 9][..], "the last chunk is short");
        assert!(up.chunk(3).is_none());
        // A slice shares the blob's buffer: no copy per publish.
        assert_eq!(up.chunk(1).unwrap().as_ptr(), up.blob[4..].as_ptr());
    }

    /// Runs `send` on a real clock and returns (topic, payload length, seconds since start).
    fn timed_send(up: Upload, rate: u64) -> (u64, Vec<(String, usize, f64)>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let l2 = log.clone();
        let total = rt.block_on(send(up, rate, move |topic, payload| {
            l2.lock()
                .unwrap()
                .push((topic, payload.len(), t0.elapsed().as_secs_f64()));
            async {}
        }));
        let log = log.lock().unwrap().clone();
        (total, log)
    }

    #[test]
    fn limited_upload_takes_total_over_rate_and_keeps_order() {
        // 6 chunks of 2000 B at 40 kB/s: chunk i at ≥ 50·i ms.
        let (total, log) = timed_send(upload(6, 2000), 40_000);
        assert_eq!(total, 12_000);
        let topics: Vec<&str> = log.iter().map(|(t, _, _)| t.as_str()).collect();
        assert_eq!(topics, ["c/0", "c/1", "c/2", "c/3", "c/4", "c/5"]);
        for (i, (_, len, at)) in log.iter().enumerate() {
            let due = 0.05 * i as f64;
            assert!(
                *at >= due - 1e-3,
                "payload {i} at {at:.3} s, due {due:.3} s"
            );
            assert_eq!(*len, 2000);
        }
        // Generous upper bound: a loaded CI machine may sleep late, never early.
        assert!(log[5].2 < 2.0, "upload took {:.3} s", log[5].2);
    }

    #[test]
    fn unlimited_upload_and_resend_subset() {
        let (total, log) = timed_send(upload(50, 1000), 0);
        assert_eq!(total, 50_000);
        assert!(log.last().unwrap().2 < 0.5, "unpaced upload waited");
        // A resend names only some chunks; indices outside the update are skipped.
        let mut up = upload(4, 100);
        up.chunks = vec![("c/3".into(), 3), ("c/9".into(), 9), ("c/1".into(), 1)];
        let (total, log) = timed_send(up, 0);
        assert_eq!(total, 200);
        let topics: Vec<&str> = log.iter().map(|(t, _, _)| t.as_str()).collect();
        assert_eq!(topics, ["c/3", "c/1"]);
    }
}
