//! SmolVLA's configuration and parameter rules without libtorch: what a process that handles
//! SmolVLA checkpoints as bytes (the aggregator) needs to agree with the model crate `smolvla`,
//! which re-exports all of it.
//!
//! Modules:
//! - [`config`]: `SmolVLAConfig` (a checkpoint's `config.json`, LeRobot's defaults, unknown
//!   fields kept), the SmolVLM2 backbone config and the derived [`ModelDims`].
//! - [`export`]: `export.json`, the manifest of an ONNX export (written by `smolvla`, read
//!   by the libtorch-free runtime `zk0-infer`).
//! - [`params`]: the freeze rules ([`is_trainable`]) and PyTorch's module order of the
//!   parameter names ([`module_order_key`]).
//!
//! A separate crate rather than a feature of `smolvla`: Cargo unifies a package's features over
//! everything built together, so a `cargo build --workspace` would hand the aggregator the
//! libtorch-linked build of `smolvla` that the trainer asks for.
//!
//! ```
//! use smolvla_config::{is_trainable, SmolVlaConfig};
//!
//! let cfg: SmolVlaConfig = serde_json::from_str(r#"{"type": "smolvla"}"#).unwrap();
//! assert!(cfg.train_expert_only);
//! assert!(is_trainable("model.action_in_proj.weight", &cfg));
//! assert!(!is_trainable("model.vlm_with_expert.vlm.lm_head.weight", &cfg));
//! ```

pub mod config;
mod error;
pub mod export;
pub mod params;

pub use config::{ModelDims, SmolVlaConfig, VlmConfig};
pub use error::{Error, Result};
pub use params::{is_trainable, module_order_key};
