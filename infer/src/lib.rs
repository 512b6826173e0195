//! The exported policy on ONNX Runtime.
//!
//! [`preprocess`]: LeRobot's host-side SmolVLA preprocessing in plain Rust (resize-with-pad,
//! MEAN_STD (un)normalization, fixed-length task tokenization).

pub mod preprocess;

pub use preprocess::{Normalizer, TaskTokenizer};
