//! The inference worker: a thread that owns the policy and turns one observation at a time
//! into a chunk of actions, so the control thread never waits for inference.
//!
//! The request channel holds one observation (the control thread `try_send`s and the queue
//! allows one request in flight), so an observation is never queued behind a stale one.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zk0_infer::{Observation, OnnxPolicy, Processor, RgbFrame, RuntimeOptions};
use zk0_robot::camera::Frame;

use super::follow::Follow;
use crate::infer_cli::Noise;

/// One observation, owned, sent to the worker.
#[derive(Debug, Clone)]
pub struct ObsRequest {
    /// The control tick the observation was taken at: the chunk's first action is for it.
    pub tick: u64,
    /// In the export's camera order.
    pub frames: Vec<Frame>,
    /// Raw `observation.state`.
    pub state: Vec<f32>,
}

/// The worker's answer to one [`ObsRequest`].
#[derive(Debug)]
pub struct ChunkReply {
    pub tick: u64,
    /// `actions[i]` for tick `tick + i`, unnormalized.
    pub actions: Result<Vec<Vec<f32>>, zk0_infer::Error>,
    /// Preprocessing, sampling and postprocessing.
    pub latency: Duration,
}

/// What computes chunks: the ONNX export ([`OnnxSource`]) or a test double.
pub trait ChunkSource: Send + 'static {
    fn chunk(&mut self, obs: &ObsRequest) -> Result<Vec<Vec<f32>>, zk0_infer::Error>;
}

/// The export on ONNX Runtime with its processor; the first `keep` actions of each chunk
/// (the export's `n_action_steps`).
pub struct OnnxSource {
    pub policy: OnnxPolicy,
    pub processor: Processor,
    pub task: String,
    pub keep: usize,
    noise: Noise,
}

/// How [`OnnxSource::open`] opens an export (the same for each export followed).
#[derive(Debug, Clone)]
pub struct SourceSettings {
    pub runtime: RuntimeOptions,
    /// A dataset's `meta/stats.json`, for an export without processor files.
    pub stats: Option<serde_json::Value>,
    /// Overrides the export's tokenizer.
    pub tokenizer: Option<PathBuf>,
    pub task: String,
    pub noise: Option<Vec<f32>>,
    pub seed: u64,
}

impl OnnxSource {
    /// The export in `dir` with its processor.
    pub fn open(dir: &Path, s: &SourceSettings) -> Result<Self, zk0_infer::Error> {
        let policy = OnnxPolicy::load(dir, &s.runtime)?;
        let processor = Processor::new(
            dir,
            &policy.manifest,
            s.stats.as_ref(),
            s.tokenizer.as_deref(),
        )?;
        Ok(Self::new(
            policy,
            processor,
            s.task.clone(),
            s.noise.clone(),
            s.seed,
        ))
    }

    /// `noise`: a fixed `[chunk_size, max_action_dim]` draw for every chunk, else a seeded
    /// N(0, 1) draw per chunk.
    pub fn new(
        policy: OnnxPolicy,
        processor: Processor,
        task: String,
        noise: Option<Vec<f32>>,
        seed: u64,
    ) -> Self {
        let keep = policy.manifest.n_action_steps.max(1) as usize;
        let noise = Noise::new(noise, seed);
        Self {
            policy,
            processor,
            task,
            keep,
            noise,
        }
    }
}

impl ChunkSource for OnnxSource {
    fn chunk(&mut self, obs: &ObsRequest) -> Result<Vec<Vec<f32>>, zk0_infer::Error> {
        let images = obs
            .frames
            .iter()
            .map(|f| RgbFrame {
                rgb: f.rgb.as_slice(),
                height: f.height as usize,
                width: f.width as usize,
            })
            .collect();
        let inputs = self.processor.inputs(&Observation {
            images,
            state: &obs.state,
            task: &self.task,
        })?;
        let m = &self.policy.manifest;
        let n = (m.chunk_size * m.max_action_dim) as usize;
        let sampled = self.policy.sample(&inputs, &self.noise.next(n), false)?;
        let flat = self.processor.actions(&sampled)?;
        Ok(flat
            .chunks(self.processor.action_dim())
            .take(self.keep)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// The worker thread and its two channels.
pub struct Worker {
    tx: Option<SyncSender<ObsRequest>>,
    rx: Receiver<ChunkReply>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(source: Box<dyn ChunkSource>) -> std::io::Result<Self> {
        Self::spawn_following(source, None)
    }

    /// With `follow`, the policy is replaced between chunks by each new export it loads.
    pub fn spawn_following(
        mut source: Box<dyn ChunkSource>,
        mut follow: Option<Follow>,
    ) -> std::io::Result<Self> {
        let (tx, requests) = mpsc::sync_channel::<ObsRequest>(1);
        let (replies, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                for obs in requests {
                    if let Some(next) = follow.as_mut().and_then(Follow::poll) {
                        source = next;
                    }
                    let t0 = Instant::now();
                    let actions = source.chunk(&obs);
                    let reply = ChunkReply {
                        tick: obs.tick,
                        actions,
                        latency: t0.elapsed(),
                    };
                    if replies.send(reply).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            rx,
            handle: Some(handle),
        })
    }

    /// Hands over an observation without blocking; gives it back when the worker is busy
    /// with one already or gone.
    pub fn try_send(&self, obs: ObsRequest) -> Result<(), TrySendError<ObsRequest>> {
        match &self.tx {
            Some(tx) => tx.try_send(obs),
            None => Err(TrySendError::Disconnected(obs)),
        }
    }

    /// A finished chunk, if any; `Err(Disconnected)` when the worker thread is gone.
    pub fn try_recv(&self) -> Result<ChunkReply, TryRecvError> {
        self.rx.try_recv()
    }
}

impl Drop for Worker {
    /// Closes the request channel and waits for the chunk under way (if any) to finish.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Actions `state + (i + 1)·step` for `n` ticks, after `delay`; NaN from `nan_at`'s tick.
    pub struct Ramp {
        pub n: usize,
        pub step: f32,
        pub delay: Duration,
        pub nan_from: Option<u64>,
    }

    impl ChunkSource for Ramp {
        fn chunk(&mut self, obs: &ObsRequest) -> Result<Vec<Vec<f32>>, zk0_infer::Error> {
            std::thread::sleep(self.delay);
            let nan = self.nan_from.is_some_and(|t| obs.tick >= t);
            Ok((0..self.n)
                .map(|i| {
                    obs.state
                        .iter()
                        .map(|s| {
                            if nan {
                                f32::NAN
                            } else {
                                s + (i + 1) as f32 * self.step
                            }
                        })
                        .collect()
                })
                .collect())
        }
    }

    #[test]
    fn one_observation_at_a_time_and_replies_keep_their_tick() {
        let w = Worker::spawn(Box::new(Ramp {
            n: 3,
            step: 1.0,
            delay: Duration::from_millis(30),
            nan_from: None,
        }))
        .unwrap();
        let obs = |tick| ObsRequest {
            tick,
            frames: vec![],
            state: vec![10.0, 20.0],
        };
        w.try_send(obs(5)).unwrap();
        // The worker takes the first at once; the channel then holds one more at most.
        let mut full = false;
        for t in 6..10 {
            if let Err(TrySendError::Full(o)) = w.try_send(obs(t)) {
                assert_eq!(o.tick, t);
                full = true;
                break;
            }
        }
        assert!(full, "a bounded channel of one");
        let r = (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(10));
                w.try_recv().ok()
            })
            .unwrap();
        assert_eq!(r.tick, 5);
        assert_eq!(r.actions.unwrap()[2], vec![13.0, 23.0]);
        assert!(r.latency >= Duration::from_millis(30), "{:?}", r.latency);
        drop(w);
    }
}
