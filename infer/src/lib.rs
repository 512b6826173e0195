//! zk0-infer: the SmolVLA policy exported by `zk0-train export-onnx`, on ONNX Runtime (`ort`,
//! loaded at run time), without libtorch: what `zk0-agent infer` and `zk0-agent act` use on
//! the robot.
//!
//! Modules:
//! - [`preprocess`]: LeRobot's host-side SmolVLA preprocessing in plain Rust (resize-with-pad,
//!   MEAN_STD (un)normalization, fixed-length task tokenization).
//! - [`processor`]: the export's pre- and postprocessor: observation → graph inputs, chunk →
//!   unnormalized actions (LeRobot's processor files, or a dataset's statistics).
//! - [`queue`]: LeRobot's asynchronous-inference action queue ([`ActionQueue`]): actions keyed
//!   by control tick, when to request the next chunk, stale dropping and overlap blending
//!   ([`Aggregate`]); a pure state machine for `zk0-agent act`'s control loop.
//! - [`runtime`]: the prefix and denoise sessions and the float32 Euler loop between them
//!   ([`OnnxPolicy`]); execution providers (CPU, CUDA, TensorRT).
//!
//! The export's layout is described by `smolvla_config::export` (`export.json`).

mod error;
pub mod preprocess;
pub mod processor;
pub mod queue;
pub mod runtime;

pub use error::{Error, Result};
pub use preprocess::{Normalizer, TaskTokenizer};
pub use processor::{Observation, Processor, RgbFrame};
pub use queue::{ActionQueue, Aggregate, QueueStats};
pub use runtime::{init, Chunk, ModelInputs, OnnxPolicy, PrefixCache, Provider, RuntimeOptions};
