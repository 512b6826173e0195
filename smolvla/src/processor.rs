//! Image and vector preprocessing at the model boundary (LeRobot's `resize_with_pad`,
//! `prepare_images`) and the MEAN_STD normalizer / unnormalizer of LeRobot's processors.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::{Error, Result, SmolVlaConfig};

/// LeRobot's `resize_with_pad`: keep the aspect ratio (bilinear, align_corners=false, no
/// antialias), then pad with `pad_value` on the LEFT and TOP to (height, width).
pub fn resize_with_pad(img: &Tensor, height: i64, width: i64, pad_value: f64) -> Tensor {
    let s = img.size();
    let (cur_h, cur_w) = (s[2], s[3]);
    let ratio = f64::max(cur_w as f64 / width as f64, cur_h as f64 / height as f64);
    let rh = (cur_h as f64 / ratio) as i64;
    let rw = (cur_w as f64 / ratio) as i64;
    let resized = img.upsample_bilinear2d([rh, rw], false, None, None);
    let pad_h = (height - rh).max(0);
    let pad_w = (width - rw).max(0);
    if pad_h == 0 && pad_w == 0 {
        return resized;
    }
    resized.pad([pad_w, 0, pad_h, 0], "constant", Some(pad_value))
}

/// `SmolVLAPolicy.prepare_images` for one camera: last time step of a 5-D input, float,
/// resize-with-pad (pad 0) to the configured size, then `x·2 − 1`.
pub fn prepare_image(img: &Tensor, height: i64, width: i64) -> Tensor {
    let img = if img.dim() == 5 {
        img.select(1, img.size()[1] - 1)
    } else {
        img.shallow_clone()
    };
    let img = img.to_kind(Kind::Float);
    let s = img.size();
    let img = if s[2] == height && s[3] == width {
        img
    } else {
        resize_with_pad(&img, height, width, 0.0)
    };
    img * 2.0 - 1.0
}

/// LeRobot's MEAN_STD normalization: `(x − mean) / (std + 1e-8)`.
pub fn normalize_mean_std(x: &Tensor, mean: &Tensor, std: &Tensor) -> Tensor {
    (x - mean) / (std + 1e-8)
}

/// The postprocessor's unnormalize: `x · std + mean` (no epsilon).
pub fn unnormalize_mean_std(x: &Tensor, mean: &Tensor, std: &Tensor) -> Tensor {
    x * std + mean
}

/// LeRobot's `NewLineTaskProcessorStep` + `TokenizerProcessorStep` for SmolVLA: task + "\n",
/// right padding to the longest prompt, truncation at `max_length`.
#[derive(Debug)]
pub struct TaskTokenizer {
    inner: tokenizers::Tokenizer,
    pub max_length: usize,
    pub pad_id: u32,
}

impl TaskTokenizer {
    /// Loads `tokenizer.json`; `pad_token` names the padding token (SmolVLM2: `<|im_end|>`).
    pub fn from_file(path: &Path, max_length: usize, pad_token: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let pad_id = inner.token_to_id(pad_token).ok_or_else(|| {
            Error::Tokenizer(format!("{}: no pad token {pad_token:?}", path.display()))
        })?;
        Ok(Self {
            inner,
            max_length,
            pad_id,
        })
    }

    /// Token ids [B, L] (int64) and attention mask [B, L] (bool), L = longest prompt.
    pub fn encode(&self, tasks: &[String]) -> Result<(Tensor, Tensor)> {
        let mut ids: Vec<Vec<i64>> = Vec::with_capacity(tasks.len());
        for t in tasks {
            let text = if t.ends_with('\n') {
                t.clone()
            } else {
                format!("{t}\n")
            };
            let enc = self
                .inner
                .encode(text, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let mut v: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
            v.truncate(self.max_length);
            ids.push(v);
        }
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        let b = ids.len() as i64;
        let mut flat = Vec::with_capacity(ids.len() * longest);
        let mut mask = Vec::with_capacity(ids.len() * longest);
        for v in &ids {
            for j in 0..longest {
                flat.push(v.get(j).copied().unwrap_or(self.pad_id as i64));
                mask.push(j < v.len());
            }
        }
        let l = longest as i64;
        Ok((
            Tensor::from_slice(&flat).view([b, l]),
            Tensor::from_slice(&mask).view([b, l]),
        ))
    }
}

/// Dataset statistics as LeRobot's normalizer processors store them
/// (`<feature>.mean`, `<feature>.std`, ... in a safetensors file).
#[derive(Debug)]
pub struct Stats {
    tensors: BTreeMap<String, Tensor>,
}

impl Stats {
    pub fn from_safetensors(path: &Path) -> Result<Self> {
        Ok(Self {
            tensors: Tensor::read_safetensors(path)?.into_iter().collect(),
        })
    }

    /// From `<feature>.<stat>` tensors (e.g. built from a dataset's `meta/stats.json`).
    pub fn from_named(tensors: BTreeMap<String, Tensor>) -> Self {
        Self { tensors }
    }

    /// From a LeRobot `stats.json` value: `{feature: {stat: [numbers...]}}` (nested lists are
    /// flattened; per-feature statistics of vectors are what normalization needs).
    pub fn from_stats_json(v: &serde_json::Value) -> Self {
        fn flat(v: &serde_json::Value, out: &mut Vec<f32>) {
            match v {
                serde_json::Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
                serde_json::Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN) as f32),
                _ => {}
            }
        }
        /// The nested-list shape (`[3, 1, 1]` for per-channel image statistics).
        fn shape(v: &serde_json::Value) -> Vec<i64> {
            match v {
                serde_json::Value::Array(a) => {
                    let mut s = vec![a.len() as i64];
                    if let Some(first) = a.first() {
                        s.extend(shape(first));
                    }
                    s
                }
                _ => vec![],
            }
        }
        let mut tensors = BTreeMap::new();
        if let Some(obj) = v.as_object() {
            for (feature, stats) in obj {
                for (stat, val) in stats.as_object().into_iter().flatten() {
                    let mut xs = Vec::new();
                    flat(val, &mut xs);
                    let mut t = Tensor::from_slice(&xs);
                    let dims = shape(val);
                    if dims.len() > 1 && dims.iter().product::<i64>() == xs.len() as i64 {
                        t = t.reshape(dims.as_slice());
                    }
                    tensors.insert(format!("{feature}.{stat}"), t);
                }
            }
        }
        Self { tensors }
    }

    /// Every `<feature>.<stat>` tensor, as the normalizer's state file stores them.
    pub fn named(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    fn get(&self, feature: &str, stat: &str) -> Result<&Tensor> {
        self.tensors
            .get(&format!("{feature}.{stat}"))
            .ok_or_else(|| Error::Batch(format!("no statistic {feature}.{stat}")))
    }

    /// MEAN_STD normalization of `feature`.
    pub fn normalize(&self, feature: &str, x: &Tensor) -> Result<Tensor> {
        Ok(normalize_mean_std(
            x,
            self.get(feature, "mean")?,
            self.get(feature, "std")?,
        ))
    }

    /// MEAN_STD unnormalization of `feature`.
    pub fn unnormalize(&self, feature: &str, x: &Tensor) -> Result<Tensor> {
        Ok(unnormalize_mean_std(
            x,
            self.get(feature, "mean")?,
            self.get(feature, "std")?,
        ))
    }
}

/// File names of the normalizer states inside a LeRobot SmolVLA checkpoint (step 5 of the
/// preprocessor, step 0 of the postprocessor).
pub const PREPROCESSOR_STATE: &str = "policy_preprocessor_step_5_normalizer_processor.safetensors";
pub const POSTPROCESSOR_STATE: &str =
    "policy_postprocessor_step_0_unnormalizer_processor.safetensors";

/// Writes LeRobot's SmolVLA processor pipelines into a checkpoint directory, as
/// `make_smolvla_pre_post_processors(...)` followed by `save_pretrained` does:
/// `policy_preprocessor.json` (rename → to-batch → task newline → tokenizer → device →
/// normalizer) and `policy_postprocessor.json` (unnormalizer → device to CPU), each with the
/// normalizer statistics in a safetensors state file.
pub fn save_processors(dir: &Path, config: &SmolVlaConfig, stats: &Stats) -> Result<()> {
    use serde_json::{json, Value};
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let device = config
        .extra
        .get("device")
        .and_then(Value::as_str)
        .unwrap_or("cpu")
        .to_string();
    let norm_map = serde_json::to_value(&config.normalization_mapping)
        .map_err(|e| Error::json(&dir.join("config.json"), e))?;
    let features = |maps: &[&crate::config::OrderedMap<crate::config::PolicyFeature>]| {
        let mut m = serde_json::Map::new();
        for map in maps {
            for (k, f) in map.iter() {
                m.insert(k.clone(), json!({"type": f.kind, "shape": f.shape}));
            }
        }
        Value::Object(m)
    };
    let pre = json!({
        "name": "policy_preprocessor",
        "steps": [
            {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
            {"registry_name": "to_batch_processor", "config": {}},
            {"registry_name": "smolvla_new_line_processor", "config": {}},
            {"registry_name": "tokenizer_processor", "config": {
                "max_length": config.tokenizer_max_length,
                "task_key": "task",
                "padding_side": "right",
                "padding": config.pad_language_to,
                "truncation": true,
                "tokenizer_name": config.vlm_model_name,
            }},
            {"registry_name": "device_processor", "config": {"device": device, "float_dtype": null}},
            {"registry_name": "normalizer_processor", "config": {
                "eps": 1e-8,
                "features": features(&[&config.input_features, &config.output_features]),
                "norm_map": norm_map,
            }, "state_file": PREPROCESSOR_STATE},
        ]
    });
    let post = json!({
        "name": "policy_postprocessor",
        "steps": [
            {"registry_name": "unnormalizer_processor", "config": {
                "eps": 1e-8,
                "features": features(&[&config.output_features]),
                "norm_map": norm_map,
            }, "state_file": POSTPROCESSOR_STATE},
            {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": null}},
        ]
    });
    for (name, v) in [
        ("policy_preprocessor.json", pre),
        ("policy_postprocessor.json", post),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(&v).map_err(|e| Error::json(&path, e))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    let named: Vec<(String, Tensor)> = stats
        .named()
        .iter()
        .map(|(k, t)| (k.clone(), t.to_kind(Kind::Float).contiguous()))
        .collect();
    for name in [PREPROCESSOR_STATE, POSTPROCESSOR_STATE] {
        Tensor::write_safetensors(&named, dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn pads_left_and_top() {
        let img = Tensor::ones([1, 3, 4, 8], (Kind::Float, Device::Cpu));
        let out = resize_with_pad(&img, 8, 8, 0.0);
        assert_eq!(out.size(), vec![1, 3, 8, 8]);
        assert_eq!(out.double_value(&[0, 0, 0, 0]), 0.0);
        assert_eq!(out.double_value(&[0, 0, 7, 7]), 1.0);
        let out = resize_with_pad(&img, 8, 8, -1.0);
        assert_eq!(out.double_value(&[0, 0, 0, 0]), -1.0);
    }
}
