//! LeRobot datasets in Rust: format v3.0 read and write, v2.1 read.
//!
//! Map of the crate:
//! - [`meta`]: `info.json`, tasks and episode metadata for both format versions, normalised into
//!   [`Episode`]s with resolved file paths.
//! - [`table`]: parquet through arrow-rs, and per-cell value extraction.
//! - [`reader`]: [`LeRobotDataset`], random access by global index or `(episode, frame)`,
//!   delta-timestamp queries for training; decoded video frames kept in a byte-bounded LRU
//!   frame cache, in front of a small pool of long-lived decoders.
//! - [`loader`]: [`Prefetcher`], batches of delta-timestamp samples read on a background thread.
//! - [`stats`]: per-episode and aggregated feature statistics (`stats.json`).
//! - [`video`]: frame decoding ([`video::FrameStream`], a long-lived decoder), encoding
//!   ([`video::StreamEncoder`], frame by frame, also while recording) and probing through the
//!   `ffmpeg`/`ffprobe` CLIs.
//! - `libav` (feature `libav`): in-process decoding through the FFmpeg libraries, one open
//!   decoder per video file that seeks to the keyframe before a request or continues; the
//!   reader uses it instead of the CLI when the feature is on (same frames, same pixels).
//! - [`verify`]: whole-dataset checks behind `zk0-agent dataset verify`.
//! - [`writer`]: [`DatasetWriter`], v3.0 recording with LeRobot's file rollover, atomic saves.
//! - [`synth`]: seeded SO-100-like synthetic datasets for demos, benches and trainer tests.
//! - [`convert`]: v2.1 → v3.0 conversion (videos stream-copied, never re-encoded).
//! - [`hub`]: `--repo-id user/name` through hf-hub's cache (offline mode honoured).
//! - [`error`]: [`DatasetError`], which always names the file (and episode) at fault.

pub mod convert;
pub mod error;
pub mod hub;
#[cfg(feature = "libav")]
pub mod libav;
pub mod loader;
pub mod meta;
pub mod reader;
pub mod stats;
pub mod synth;
pub mod table;
pub mod verify;
pub mod video;
pub mod writer;

pub use error::{DatasetError, Result};
pub use loader::Prefetcher;
pub use meta::{Episode, Feature, Features, Info, Version, VideoSpan};
pub use reader::{DeltaSample, Frame, LeRobotDataset};
pub use table::FeatureValue;
pub use writer::{DatasetConfig, DatasetWriter, FrameData};
