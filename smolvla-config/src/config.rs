//! Configuration: LeRobot's `SmolVLAConfig` (`config.json` of a checkpoint) and the SmolVLM2
//! backbone config (`SmolVLMConfig.to_dict()`: text, vision, connector scale factor).
//!
//! Field names and defaults follow `lerobot/policies/smolvla/configuration_smolvla.py`; unknown
//! fields are kept in `extra` so a config round-trips.

use std::path::Path;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// A JSON object whose key order is kept (LeRobot's camera order is the insertion order of
/// `input_features`, and serde_json's default map is sorted).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> OrderedMap<V> {
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(V2(std::marker::PhantomData))
    }
}

impl<V: Serialize> Serialize for OrderedMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// One entry of `input_features` / `output_features`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyFeature {
    #[serde(rename = "type")]
    pub kind: String,
    pub shape: Vec<i64>,
}

fn d_type() -> String {
    "smolvla".into()
}
fn d_one() -> i64 {
    1
}
fn d_chunk() -> i64 {
    50
}
fn d_32() -> i64 {
    32
}
fn d_resize() -> (i64, i64) {
    (512, 512)
}
fn d_tok_len() -> i64 {
    48
}
fn d_steps() -> i64 {
    10
}
fn d_true() -> bool {
    true
}
fn d_lr() -> f64 {
    1e-4
}
fn d_betas() -> (f64, f64) {
    (0.9, 0.95)
}
fn d_eps() -> f64 {
    1e-8
}
fn d_wd() -> f64 {
    1e-10
}
fn d_clip() -> f64 {
    10.0
}
fn d_warmup() -> i64 {
    1000
}
fn d_decay() -> i64 {
    30_000
}
fn d_decay_lr() -> f64 {
    2.5e-6
}
fn d_vlm_name() -> String {
    "HuggingFaceTB/SmolVLM2-500M-Video-Instruct".into()
}
fn d_attn_mode() -> String {
    "cross_attn".into()
}
fn d_minus_one() -> i64 {
    -1
}
fn d_longest() -> String {
    "longest".into()
}
fn d_vlm_layers() -> i64 {
    16
}
fn d_two() -> i64 {
    2
}
fn d_width() -> f64 {
    0.75
}
fn d_min_period() -> f64 {
    4e-3
}
fn d_max_period() -> f64 {
    4.0
}
fn d_norm_map() -> OrderedMap<String> {
    OrderedMap(vec![
        ("VISUAL".into(), "IDENTITY".into()),
        ("STATE".into(), "MEAN_STD".into()),
        ("ACTION".into(), "MEAN_STD".into()),
    ])
}

/// LeRobot's `SmolVLAConfig` as stored in a checkpoint's `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmolVlaConfig {
    #[serde(rename = "type", default = "d_type")]
    pub kind: String,
    #[serde(default = "d_one")]
    pub n_obs_steps: i64,
    #[serde(default)]
    pub input_features: OrderedMap<PolicyFeature>,
    #[serde(default)]
    pub output_features: OrderedMap<PolicyFeature>,
    #[serde(default = "d_chunk")]
    pub chunk_size: i64,
    #[serde(default = "d_chunk")]
    pub n_action_steps: i64,
    #[serde(default = "d_norm_map")]
    pub normalization_mapping: OrderedMap<String>,
    #[serde(default = "d_32")]
    pub max_state_dim: i64,
    #[serde(default = "d_32")]
    pub max_action_dim: i64,
    /// Stored as (width, height).
    #[serde(default = "d_resize")]
    pub resize_imgs_with_padding: (i64, i64),
    #[serde(default)]
    pub empty_cameras: i64,
    #[serde(default)]
    pub adapt_to_pi_aloha: bool,
    #[serde(default)]
    pub use_delta_joint_actions_aloha: bool,
    #[serde(default = "d_tok_len")]
    pub tokenizer_max_length: i64,
    #[serde(default = "d_steps")]
    pub num_steps: i64,
    #[serde(default = "d_true")]
    pub use_cache: bool,
    #[serde(default = "d_true")]
    pub freeze_vision_encoder: bool,
    #[serde(default = "d_true")]
    pub train_expert_only: bool,
    #[serde(default = "d_true")]
    pub train_state_proj: bool,
    #[serde(default = "d_lr")]
    pub optimizer_lr: f64,
    #[serde(default = "d_betas")]
    pub optimizer_betas: (f64, f64),
    #[serde(default = "d_eps")]
    pub optimizer_eps: f64,
    #[serde(default = "d_wd")]
    pub optimizer_weight_decay: f64,
    #[serde(default = "d_clip")]
    pub optimizer_grad_clip_norm: f64,
    #[serde(default = "d_warmup")]
    pub scheduler_warmup_steps: i64,
    #[serde(default = "d_decay")]
    pub scheduler_decay_steps: i64,
    #[serde(default = "d_decay_lr")]
    pub scheduler_decay_lr: f64,
    #[serde(default = "d_vlm_name")]
    pub vlm_model_name: String,
    #[serde(default = "d_true")]
    pub load_vlm_weights: bool,
    #[serde(default)]
    pub add_image_special_tokens: bool,
    #[serde(default = "d_attn_mode")]
    pub attention_mode: String,
    #[serde(default = "d_minus_one")]
    pub prefix_length: i64,
    #[serde(default = "d_longest")]
    pub pad_language_to: String,
    #[serde(default = "d_minus_one")]
    pub num_expert_layers: i64,
    #[serde(default = "d_vlm_layers")]
    pub num_vlm_layers: i64,
    #[serde(default = "d_two")]
    pub self_attn_every_n_layers: i64,
    #[serde(default = "d_width")]
    pub expert_width_multiplier: f64,
    #[serde(default = "d_min_period")]
    pub min_period: f64,
    #[serde(default = "d_max_period")]
    pub max_period: f64,
    /// Every other field of `config.json` (device, push_to_hub, rtc_config, ...), kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for SmolVlaConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl SmolVlaConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::json(path, e))
    }

    /// Camera keys in LeRobot's order (`config.image_features`: VISUAL input features).
    pub fn image_keys(&self) -> Vec<String> {
        self.input_features
            .iter()
            .filter(|(_, f)| f.kind == "VISUAL")
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Dimension of the real (unpadded) action, from `output_features["action"]`.
    pub fn action_dim(&self) -> Option<i64> {
        self.output_features
            .get("action")
            .and_then(|f| f.shape.last().copied())
    }

    /// Number of expert layers actually built (`-1` means as many as VLM layers).
    pub fn expert_layers(&self) -> i64 {
        if self.num_expert_layers <= 0 {
            self.num_vlm_layers
        } else {
            self.num_expert_layers
        }
    }

    /// (height, width) that images are resized-with-pad to.
    pub fn resize_hw(&self) -> (i64, i64) {
        (
            self.resize_imgs_with_padding.1,
            self.resize_imgs_with_padding.0,
        )
    }
}

fn d_rope() -> f64 {
    100_000.0
}

/// Llama-style text config (`SmolVLMConfig.text_config`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    pub vocab_size: i64,
    #[serde(default = "d_rms_eps")]
    pub rms_norm_eps: f64,
    /// Not used by SmolVLA (its `apply_rope` hard-codes base 10000); kept for round trips.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn d_rms_eps() -> f64 {
    1e-5
}
fn d_ln_eps() -> f64 {
    1e-6
}
fn d_channels() -> i64 {
    3
}
fn d_scale() -> i64 {
    4
}

impl TextConfig {
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// The rope theta of the backbone config (reported only: SmolVLA's `apply_rope` uses 10000).
    pub fn config_rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or_else(d_rope)
    }
}

/// SigLIP-style vision config (`SmolVLMConfig.vision_config`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub patch_size: i64,
    pub image_size: i64,
    #[serde(default = "d_channels")]
    pub num_channels: i64,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The SmolVLM2 backbone config.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VlmConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    #[serde(default = "d_scale")]
    pub scale_factor: i64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl VlmConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::json(path, e))
    }

    /// `HuggingFaceTB/SmolVLM2-500M-Video-Instruct`'s architecture (the backbone of
    /// `lerobot/smolvla_base`), for building the full-size model without the Hub.
    pub fn smolvlm2_500m() -> Self {
        let v = serde_json::json!({
            "scale_factor": 4,
            "text_config": {
                "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64,
                "vocab_size": 49280, "rms_norm_eps": 1e-5, "rope_theta": 100000.0
            },
            "vision_config": {
                "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "patch_size": 16, "image_size": 512,
                "layer_norm_eps": 1e-6
            }
        });
        serde_json::from_value(v).expect("static config")
    }
}

/// LeRobot's `get_intermediate_size`: 2/3 of 4·hidden, times the multiplier, rounded up to a
/// multiple of 256.
pub fn expert_intermediate_size(hidden_dim: i64) -> i64 {
    let (ffn_dim_multiplier, multiple_of) = (4.0f64, 256i64);
    let mut h = (2.0 * hidden_dim as f64 / 3.0) as i64;
    h = (ffn_dim_multiplier * h as f64) as i64;
    multiple_of * ((h + multiple_of - 1) / multiple_of)
}

/// Everything the model's shapes depend on, derived once from the two configs.
#[derive(Debug, Clone)]
pub struct ModelDims {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub scale_factor: i64,
    pub vlm_layers: i64,
    pub expert_layers: i64,
    pub expert_hidden: i64,
    pub expert_intermediate: i64,
}

impl ModelDims {
    pub fn new(cfg: &SmolVlaConfig, vlm: &VlmConfig) -> Result<Self> {
        let expert_hidden =
            (vlm.text_config.hidden_size as f64 * cfg.expert_width_multiplier) as i64;
        let expert_layers = cfg.expert_layers();
        if cfg.num_vlm_layers <= 0 || cfg.num_vlm_layers > vlm.text_config.num_hidden_layers {
            return Err(Error::Invalid(format!(
                "num_vlm_layers {} outside 1..={}",
                cfg.num_vlm_layers, vlm.text_config.num_hidden_layers
            )));
        }
        if cfg.num_vlm_layers % expert_layers != 0 {
            return Err(Error::Invalid(format!(
                "num_vlm_layers {} is not a multiple of num_expert_layers {expert_layers}",
                cfg.num_vlm_layers
            )));
        }
        if cfg.attention_mode != "cross_attn" && cfg.attention_mode != "self_attn" {
            return Err(Error::Invalid(format!(
                "unsupported attention_mode {:?}",
                cfg.attention_mode
            )));
        }
        if cfg.add_image_special_tokens {
            return Err(Error::Invalid(
                "add_image_special_tokens=true is not supported".into(),
            ));
        }
        Ok(Self {
            text: vlm.text_config.clone(),
            vision: vlm.vision_config.clone(),
            scale_factor: vlm.scale_factor,
            vlm_layers: cfg.num_vlm_layers,
            expert_layers,
            expert_hidden,
            expert_intermediate: expert_intermediate_size(expert_hidden),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_lerobot() {
        let c = SmolVlaConfig::default();
        assert_eq!(c.chunk_size, 50);
        assert_eq!(c.resize_hw(), (512, 512));
        assert_eq!(c.num_vlm_layers, 16);
        assert_eq!(c.expert_layers(), 16);
        assert_eq!(c.optimizer_betas, (0.9, 0.95));
        assert_eq!(expert_intermediate_size(720), 2048);
        assert_eq!(expert_intermediate_size(48), 256);
    }

    #[test]
    fn camera_order_is_insertion_order() {
        let c: SmolVlaConfig = serde_json::from_str(
            r#"{"input_features": {"observation.images.front": {"type": "VISUAL", "shape": [3, 4, 4]},
                "observation.images.wrist": {"type": "VISUAL", "shape": [3, 4, 4]},
                "observation.images.top": {"type": "VISUAL", "shape": [3, 4, 4]}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.image_keys(),
            vec![
                "observation.images.front",
                "observation.images.wrist",
                "observation.images.top"
            ]
        );
    }
}
