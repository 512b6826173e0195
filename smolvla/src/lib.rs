//! SmolVLA, LeRobot's vision-language-action policy, on libtorch (`tch`).
//!
//! A faithful port of `lerobot/policies/smolvla` (lerobot 0.6.1): the SmolVLM2 backbone cut to
//! `num_vlm_layers` (SigLIP vision tower, pixel-shuffle connector, Llama text layers), the
//! action expert interleaving cross- and self-attention, flow matching with padding masks, the
//! cached Euler sampler, the freeze rules and the AdamW/clip/cosine schedule of LeRobot's preset.
//! Parameter names are LeRobot's state-dict keys, so `model.safetensors` loads by name.
//!
//! Modules:
//! - [`config`]: `SmolVLAConfig` and the backbone config, with LeRobot's defaults (from the
//!   libtorch-free `smolvla-config` crate, with the freeze rules, for the aggregator).
//! - [`layers`]: linear, norms, RoPE, eager attention, mask helpers.
//! - [`vision`]: SigLIP vision tower and connector.
//! - [`text`]: Llama decoder layers, text model and action expert.
//! - [`model`]: `SmolVLMWithExpertModel` and `VLAFlowMatching` (loss, sampler).
//! - [`onnx`]: ONNX export of the inference path (prefix and denoise graphs, `export.json`).
//! - [`policy`]: `SmolVLAPolicy` (weights, freeze rules, batch preparation, action queue).
//! - [`processor`]: resize-with-pad, normalization.
//! - [`optim`]: AdamW, gradient clipping, cosine-with-warmup schedule.
//! - [`hub`]: checkpoints by Hub id through hf-hub's cache (offline mode honoured).
//! - [`device`]: the `auto|cpu|cuda[:N]` device option.
//! - [`weights`]: a safetensors file read one tensor at a time.
//!
//! [`layers::autocast`] runs the matrix products in bfloat16 (`--bf16` in zk0-train).

pub use smolvla_config::config;
pub mod device;
mod error;
pub mod hub;
pub mod layers;
pub mod model;
pub mod onnx;
pub mod optim;
pub mod policy;
pub mod processor;
pub mod text;
pub mod vision;
pub mod weights;

pub use config::{ModelDims, SmolVlaConfig, VlmConfig};
pub use error::{Error, Result};
pub use model::{Trace, VlaFlowMatching};
pub use policy::{Batch, LossOutput, SmolVlaPolicy};
