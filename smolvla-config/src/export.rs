//! `export.json`: what `zk0-train export-onnx` writes beside the two ONNX graphs, enough for
//! any ONNX runtime to drive them: every input and output with dtype and shape, the cache
//! wiring between the graphs, the sampler's steps and the host-side pre- and post-processing.
//!
//! Driving an export (what `zk0-infer` does):
//! 1. Per camera, resize the frame (float [0, 1], CHW) with padding to `image.height` ×
//!    `image.width` (bilinear, aspect kept, padded on the left and top with `image.pad_value`:
//!    LeRobot's `resize_with_pad`); the graph itself maps it to [−1, 1]. Its `mask` input is
//!    true for a real camera.
//! 2. Tokenize `task + "\n"` with the tokenizer file, truncate and right-pad to
//!    `language.max_length` (pad tokens masked out).
//! 3. Normalize the state per `normalization` with the statistics of the preprocessor file
//!    (MEAN_STD: `(x − mean) / (std + 1e-8)`).
//! 4. Run `prefix`; feed its outputs (the pad mask and every `kv` entry) to `denoise`.
//! 5. From noise `x` [1, chunk_size, max_action_dim] ~ N(0, 1) at t = 1, for k in
//!    0..num_steps: `x += dt · v_t(x, t)` with dt = −1/num_steps, t = 1 + k·dt, in float32.
//! 6. Keep the first `action_dim` columns and unnormalize them with the postprocessor's
//!    statistics (`x · std + mean`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The manifest's file name.
pub const MANIFEST: &str = "export.json";
/// `format` of a zk0 SmolVLA export.
pub const FORMAT: &str = "zk0-smolvla-onnx";
/// The manifest version this code writes and reads.
pub const VERSION: u32 = 1;

/// Graph value names shared by the exporter and the runtime.
pub const PREFIX_PAD_MASK: &str = "prefix_pad_mask";
pub const X_T: &str = "x_t";
pub const TIMESTEP: &str = "timestep";
pub const V_T: &str = "v_t";

/// One graph input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    /// numpy's name: float32, float16, float64, int64, bool.
    pub dtype: String,
    pub shape: Vec<i64>,
}

/// One `.onnx` file with its external data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphFile {
    pub file: String,
    pub data: String,
    pub sha256: String,
    pub data_sha256: String,
    pub nodes: usize,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// The cache of one decoder layer: an output of `prefix` and an input of `denoise` under the
/// same names, [1, prefix_len, kv_heads, head_dim] each. `cross` layers carry the expert's
/// projections of the VLM's keys/values (`cross_key_{l}`), self-attention layers the VLM's
/// post-RoPE keys/values (`past_key_{l}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvInput {
    pub layer: i64,
    pub cross: bool,
    pub key: String,
    pub value: String,
}

/// One camera input of `prefix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Camera {
    /// The LeRobot feature key, also the graph input's name (float32 [1, 3, H, W] in [0, 1]).
    pub key: String,
    /// The bool [1] input saying the camera is present.
    pub mask: String,
    /// The feature's shape in the checkpoint config ([3, h, w] of the recorded frames).
    pub source_shape: Vec<i64>,
}

/// Image preprocessing on the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagePrep {
    pub height: i64,
    pub width: i64,
    pub pad_value: f64,
}

/// Language preprocessing on the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LanguagePrep {
    pub tokens: String,
    pub mask: String,
    pub max_length: i64,
    /// The tokenizer file beside the manifest, when the checkpoint had one.
    pub tokenizer: Option<String>,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportManifest {
    pub format: String,
    pub version: u32,
    /// The checkpoint exported (a directory or Hub id, as given).
    pub source: String,
    /// `fp32`, or `fp16` (matrix products in float16, the rest float32).
    pub precision: String,
    pub opset: i64,
    pub ir_version: i64,
    pub prefix: GraphFile,
    pub denoise: GraphFile,
    pub kv: Vec<KvInput>,
    pub prefix_len: i64,
    pub chunk_size: i64,
    pub n_action_steps: i64,
    pub num_steps: i64,
    pub max_action_dim: i64,
    pub max_state_dim: i64,
    pub action_dim: i64,
    pub state_dim: i64,
    pub cameras: Vec<Camera>,
    pub image: ImagePrep,
    pub language: LanguagePrep,
    /// LeRobot's normalization mapping (`STATE`/`ACTION`/`VISUAL` → `MEAN_STD`, `IDENTITY`, ...).
    pub normalization: BTreeMap<String, String>,
    /// LeRobot processor files and the tokenizer copied beside the manifest.
    pub processor_files: Vec<String>,
}

impl ExportManifest {
    /// Reads and checks `dir/export.json`.
    pub fn from_dir(dir: &std::path::Path) -> crate::Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
        let m: Self = serde_json::from_str(&text).map_err(|e| crate::Error::json(&path, e))?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(crate::Error::Invalid(format!(
                "{}: format {:?} version {}, this build reads {FORMAT:?} version {VERSION}",
                path.display(),
                m.format,
                m.version
            )));
        }
        Ok(m)
    }

    /// dt of the Euler sampler.
    pub fn dt(&self) -> f32 {
        -1.0 / self.num_steps as f32
    }
}

/// Files of a checkpoint directory that travel with an export.
pub fn is_processor_file(name: &str) -> bool {
    name.starts_with("policy_preprocessor")
        || name.starts_with("policy_postprocessor")
        || matches!(
            name,
            "tokenizer.json" | "tokenizer_config.json" | "special_tokens_map.json"
        )
}
