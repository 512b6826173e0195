//! Splitting blobs into fixed-size chunks and putting them back together.
//!
//! Every chunk but the last is exactly `chunk_size` bytes; the last holds the rest. A blob of
//! zero bytes has zero chunks. Validation ([`ChunkTracker`]: which chunks arrived, are they
//! in range and the right length) is kept apart from storage ([`Reassembly`] keeps them in
//! memory) so the aggregator can spool chunks to disk and still share the checks.

use crate::hash::sha256;
use crate::ProtoError;

/// 1 MiB: fits default broker limits once rumqttc's packet cap is raised a little past it.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;

/// The chunks of `blob`, in order. A `chunk_size` of 0 is treated as 1 rather than panicking.
pub fn split(blob: &[u8], chunk_size: usize) -> std::slice::Chunks<'_, u8> {
    blob.chunks(chunk_size.max(1))
}

/// How many chunks a blob of `len` bytes takes (saturating at `u32::MAX`).
pub fn chunk_count(len: usize, chunk_size: usize) -> u32 {
    u32::try_from(len.div_ceil(chunk_size.max(1))).unwrap_or(u32::MAX)
}

/// Whether an insert brought a new chunk or repeated one already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    New,
    Duplicate,
}

/// Bookkeeping for one blob's chunks, without their bytes.
#[derive(Debug, Clone)]
pub struct ChunkTracker {
    total_len: u64,
    chunk_count: u32,
    chunk_size: u32,
    received: Vec<u64>,
    received_count: u32,
    duplicates: u64,
}

impl ChunkTracker {
    /// Checks the announced layout is self-consistent and at most `max_len` bytes.
    pub fn new(
        total_len: u64,
        chunk_count: u32,
        chunk_size: u32,
        max_len: u64,
    ) -> Result<Self, ProtoError> {
        if total_len > max_len {
            return Err(ProtoError::Oversize {
                what: "blob",
                len: total_len,
                max: max_len,
            });
        }
        if chunk_size == 0 {
            return Err(ProtoError::ChunkLayout("chunk size is 0".into()));
        }
        let expected = total_len.div_ceil(u64::from(chunk_size));
        if expected != u64::from(chunk_count) {
            return Err(ProtoError::ChunkLayout(format!(
                "{total_len} bytes in chunks of {chunk_size} make {expected} chunks, not {chunk_count}"
            )));
        }
        Ok(Self {
            total_len,
            chunk_count,
            chunk_size,
            received: vec![0; (chunk_count as usize).div_ceil(64)],
            received_count: 0,
            duplicates: 0,
        })
    }

    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunk_count
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Byte offset of chunk `index` in the blob.
    pub fn offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.chunk_size)
    }

    /// The exact length chunk `index` must have.
    pub fn expected_len(&self, index: u32) -> Result<usize, ProtoError> {
        if index >= self.chunk_count {
            return Err(ProtoError::ChunkIndex {
                index,
                count: self.chunk_count,
            });
        }
        let len = (self.total_len - self.offset(index)).min(u64::from(self.chunk_size));
        // len ≤ chunk_size, a u32, so this fits any usize we run on.
        Ok(len as usize)
    }

    /// Validates index and length, then reports whether the chunk is new or a repeat. Does not
    /// record it: call [`mark`](Self::mark) once the bytes are safely stored.
    pub fn check(&self, index: u32, len: usize) -> Result<InsertOutcome, ProtoError> {
        let expected = self.expected_len(index)?;
        if len != expected {
            return Err(ProtoError::ChunkLength {
                index,
                len,
                expected,
            });
        }
        Ok(if self.is_received(index) {
            InsertOutcome::Duplicate
        } else {
            InsertOutcome::New
        })
    }

    /// Records chunk `index` as held (idempotent; out-of-range indices are ignored).
    /// Returns whether it was new.
    pub fn mark(&mut self, index: u32) -> bool {
        if index >= self.chunk_count {
            return false;
        }
        let (word, bit) = ((index / 64) as usize, index % 64);
        let new = self.received[word] & (1 << bit) == 0;
        if new {
            self.received[word] |= 1 << bit;
            self.received_count += 1;
        } else {
            self.duplicates += 1;
        }
        new
    }

    pub fn is_received(&self, index: u32) -> bool {
        index < self.chunk_count && self.received[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    pub fn received_count(&self) -> u32 {
        self.received_count
    }

    /// How many repeats were marked: a caller can treat many as a flood.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    pub fn is_complete(&self) -> bool {
        self.received_count == self.chunk_count
    }

    /// Indices not yet received, ascending.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.chunk_count)
            .filter(|&i| !self.is_received(i))
            .collect()
    }
}

/// An in-memory reassembly buffer that verifies the whole blob's SHA-256 at the end.
#[derive(Debug, Clone)]
pub struct Reassembly {
    tracker: ChunkTracker,
    sha256: [u8; 32],
    // Allocated on the first chunk, so a manifest alone costs no memory.
    buf: Vec<u8>,
}

impl Reassembly {
    pub fn new(
        total_len: u64,
        chunk_count: u32,
        chunk_size: u32,
        sha256: [u8; 32],
        max_len: u64,
    ) -> Result<Self, ProtoError> {
        let tracker = ChunkTracker::new(total_len, chunk_count, chunk_size, max_len)?;
        if usize::try_from(total_len).is_err() {
            return Err(ProtoError::Oversize {
                what: "blob",
                len: total_len,
                max: usize::MAX as u64,
            });
        }
        Ok(Self {
            tracker,
            sha256,
            buf: Vec::new(),
        })
    }

    /// Stores a chunk. A repeat with identical bytes is `Duplicate`; with different bytes it is
    /// `ChunkConflict` (the first copy is kept).
    pub fn insert(&mut self, index: u32, bytes: &[u8]) -> Result<InsertOutcome, ProtoError> {
        let outcome = self.tracker.check(index, bytes.len())?;
        let start = self.tracker.offset(index) as usize;
        let range = start..start + bytes.len();
        match outcome {
            InsertOutcome::Duplicate => {
                if self.buf.get(range) != Some(bytes) {
                    return Err(ProtoError::ChunkConflict { index });
                }
            }
            InsertOutcome::New => {
                if self.buf.is_empty() {
                    self.buf = vec![0; self.tracker.total_len as usize];
                }
                self.buf[range].copy_from_slice(bytes);
            }
        }
        self.tracker.mark(index);
        Ok(outcome)
    }

    pub fn missing(&self) -> Vec<u32> {
        self.tracker.missing()
    }

    pub fn is_complete(&self) -> bool {
        self.tracker.is_complete()
    }

    pub fn tracker(&self) -> &ChunkTracker {
        &self.tracker
    }

    /// The blob, once every chunk arrived and its SHA-256 matches.
    pub fn finish(self) -> Result<Vec<u8>, ProtoError> {
        if !self.is_complete() {
            return Err(ProtoError::Incomplete {
                missing: self.tracker.chunk_count - self.tracker.received_count,
            });
        }
        let buf = self.buf; // empty for a zero-length blob
        let actual = sha256(&buf);
        if actual != self.sha256 {
            return Err(ProtoError::HashMismatch {
                expected: hex::encode(self.sha256),
                actual: hex::encode(actual),
            });
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blob(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn split_and_count_agree() {
        for (len, cs, n) in [
            (0, 4, 0),
            (1, 4, 1),
            (4, 4, 1),
            (5, 4, 2),
            (8, 4, 2),
            (9, 1, 9),
        ] {
            assert_eq!(chunk_count(len, cs), n);
            let b = blob(len);
            let chunks: Vec<_> = split(&b, cs).collect();
            assert_eq!(chunks.len(), n as usize);
            assert_eq!(chunks.concat(), b);
        }
        assert_eq!(split(&blob(3), 0).count(), 3);
        assert_eq!(chunk_count(usize::MAX, 1), u32::MAX);
    }

    #[test]
    fn layout_is_validated() {
        assert!(ChunkTracker::new(10, 3, 4, 100).is_ok());
        assert!(matches!(
            ChunkTracker::new(10, 2, 4, 100),
            Err(ProtoError::ChunkLayout(_))
        ));
        assert!(matches!(
            ChunkTracker::new(10, 3, 0, 100),
            Err(ProtoError::ChunkLayout(_))
        ));
        assert!(matches!(
            ChunkTracker::new(101, 26, 4, 100),
            Err(ProtoError::Oversize { .. })
        ));
        // A huge claimed count is refused by the size cap before any bitmap is allocated.
        assert!(ChunkTracker::new(u64::MAX, u32::MAX, 1, 1 << 30).is_err());
        assert!(ChunkTracker::new(0, 0, 4, 100).unwrap().is_complete());
    }

    #[test]
    fn insert_rejects_bad_chunks() {
        let b = blob(10);
        let mut r = Reassembly::new(10, 3, 4, sha256(&b), 100).unwrap();
        assert!(matches!(
            r.insert(3, &b[..2]),
            Err(ProtoError::ChunkIndex { index: 3, count: 3 })
        ));
        assert!(matches!(
            r.insert(0, &b[..3]),
            Err(ProtoError::ChunkLength {
                index: 0,
                len: 3,
                expected: 4
            })
        ));
        assert!(matches!(
            r.insert(2, &b[8..9]),
            Err(ProtoError::ChunkLength { expected: 2, .. })
        ));
        assert_eq!(r.insert(2, &b[8..]).unwrap(), InsertOutcome::New);
        assert_eq!(r.insert(2, &b[8..]).unwrap(), InsertOutcome::Duplicate);
        assert!(matches!(
            r.insert(2, &[0, 0]),
            Err(ProtoError::ChunkConflict { index: 2 })
        ));
        assert_eq!(r.missing(), vec![0, 1]);
        assert!(!r.is_complete());
        assert_eq!(r.tracker().duplicates(), 1);
        assert!(matches!(
            r.clone().finish(),
            Err(ProtoError::Incomplete { missing: 2 })
        ));
        r.insert(0, &b[..4]).unwrap();
        r.insert(1, &b[4..8]).unwrap();
        assert_eq!(r.finish().unwrap(), b);
    }

    #[test]
    fn empty_blob() {
        let r = Reassembly::new(0, 0, 4, sha256(b""), 0).unwrap();
        assert!(r.is_complete());
        assert_eq!(r.finish().unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn tracker_for_spooling_callers() {
        let mut t = ChunkTracker::new(10, 3, 4, 10).unwrap();
        assert_eq!(t.check(1, 4).unwrap(), InsertOutcome::New);
        assert!(t.mark(1));
        assert_eq!(t.check(1, 4).unwrap(), InsertOutcome::Duplicate);
        assert!(!t.mark(1));
        assert!(!t.mark(99));
        assert_eq!(t.offset(2), 8);
        assert_eq!(t.received_count(), 1);
        assert_eq!(t.missing(), vec![0, 2]);
    }

    proptest! {
        #[test]
        fn any_order_with_duplicates_reassembles(
            len in 0usize..5000,
            chunk_size in 1u32..700,
            order_seed in any::<u64>(),
            dup_every in 1usize..5,
        ) {
            let b = blob(len);
            let n = chunk_count(len, chunk_size as usize);
            let mut r = Reassembly::new(len as u64, n, chunk_size, sha256(&b), len as u64).unwrap();
            let chunks: Vec<&[u8]> = split(&b, chunk_size as usize).collect();
            // Shuffle with a small LCG, then send some chunks twice.
            let mut order: Vec<u32> = (0..n).collect();
            let mut s = order_seed | 1;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            for (k, &i) in order.iter().enumerate() {
                prop_assert_eq!(r.insert(i, chunks[i as usize]).unwrap(), InsertOutcome::New);
                if k % dup_every == 0 {
                    prop_assert_eq!(r.insert(i, chunks[i as usize]).unwrap(), InsertOutcome::Duplicate);
                }
            }
            prop_assert!(r.missing().is_empty());
            prop_assert_eq!(r.finish().unwrap(), b);
        }

        #[test]
        fn flipped_byte_is_a_hash_mismatch(len in 1usize..3000, chunk_size in 1u32..500, pos in any::<usize>(), bit in 0u8..8) {
            let b = blob(len);
            let mut bad = b.clone();
            bad[pos % len] ^= 1 << bit;
            let n = chunk_count(len, chunk_size as usize);
            let mut r = Reassembly::new(len as u64, n, chunk_size, sha256(&b), u64::MAX).unwrap();
            for (i, c) in split(&bad, chunk_size as usize).enumerate() {
                r.insert(i as u32, c).unwrap();
            }
            let mismatch = matches!(r.finish(), Err(ProtoError::HashMismatch { .. }));
            prop_assert!(mismatch);
        }
    }
}
