//! Training batches read ahead on a background thread.
//!
//! Decoding (parquet rows, ffmpeg frames) overlaps with the training step: a worker thread fills a
//! bounded channel `depth` batches ahead; dropping the iterator stops the worker at its next send.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::Result;
use crate::reader::{DeltaSample, LeRobotDataset};

/// Iterator over batches of [`DeltaSample`]s in the order of `indices`.
#[derive(Debug)]
pub struct Prefetcher {
    rx: Receiver<Result<Vec<DeltaSample>>>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts the worker. `indices` are global frame indices (shuffle them for training);
    /// `deltas` is LeRobot's `delta_timestamps` (feature → offsets in seconds); the last batch
    /// may be short. After an error the iterator yields it and ends.
    pub fn new(
        dataset: Arc<LeRobotDataset>,
        indices: Vec<usize>,
        batch_size: usize,
        deltas: BTreeMap<String, Vec<f64>>,
        depth: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let batch_size = batch_size.max(1);
        let worker = std::thread::Builder::new()
            .name("lerobot-prefetch".into())
            .spawn(move || {
                for chunk in indices.chunks(batch_size) {
                    let batch: Result<Vec<DeltaSample>> = chunk
                        .iter()
                        .map(|&i| dataset.get_deltas(i, &deltas))
                        .collect();
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .ok();
        Prefetcher { rx, worker }
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Vec<DeltaSample>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Unblock a worker waiting on a full channel, then wait for it.
        let (_tx, rx) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
