//! LeRobot's SmolVLA pre- and postprocessor around an export: an observation (camera frames,
//! raw state, task) → the graphs' [`ModelInputs`], and a sampled chunk → unnormalized actions.
//! The statistics come from the processor files shipped with the export (LeRobot's
//! `policy_preprocessor.json` / `policy_postprocessor.json` and their state files), or, for a
//! checkpoint saved without processors, from a dataset's `meta/stats.json` (what LeRobot does
//! when it builds the processors from `dataset.meta.stats`).

use std::path::Path;

use smolvla_config::export::ExportManifest;

use crate::preprocess::{self, Normalizer, TaskTokenizer};
use crate::runtime::{Chunk, ModelInputs};
use crate::{Error, Result};

/// One camera frame as cameras and video decoders give it: RGB, u8, HWC.
#[derive(Debug, Clone, Copy)]
pub struct RgbFrame<'a> {
    pub rgb: &'a [u8],
    pub height: usize,
    pub width: usize,
}

/// One observation, in the manifest's camera order.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub images: Vec<RgbFrame<'a>>,
    /// Raw (unnormalized) `observation.state`.
    pub state: &'a [f32],
    pub task: &'a str,
}

const STATE: &str = "observation.state";
const ACTION: &str = "action";

/// The pre- and postprocessing of one export.
#[derive(Debug)]
pub struct Processor {
    tokenizer: TaskTokenizer,
    pre: Option<Normalizer>,
    post: Option<Normalizer>,
    height: usize,
    width: usize,
    pad_value: f32,
    length: usize,
    cameras: usize,
    action_dim: usize,
    max_action_dim: usize,
}

fn prep(e: preprocess::Error) -> Error {
    Error::Config(e.to_string())
}

/// The state file of `step` in a saved LeRobot processor (`policy_*processor.json`).
fn state_file(dir: &Path, processor: &str, step: &str) -> Result<Option<std::path::PathBuf>> {
    let path = dir.join(processor);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok(v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["registry_name"] == step)
        .and_then(|s| s["state_file"].as_str())
        .map(|f| dir.join(f)))
}

/// MEAN_STD statistics of `features` from a `meta/stats.json` value.
fn from_stats_json(stats: &serde_json::Value, features: &[&str]) -> Result<Normalizer> {
    let vec = |f: &str, s: &str| -> Result<Vec<f32>> {
        stats[f][s]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                    .collect()
            })
            .ok_or_else(|| Error::Config(format!("dataset stats have no {f}.{s}")))
    };
    let mut n = Normalizer::default();
    for f in features {
        n.insert(f.to_string(), vec(f, "mean")?, vec(f, "std")?)
            .map_err(prep)?;
    }
    Ok(n)
}

impl Processor {
    /// The processor of the export in `dir`. `dataset_stats` (a `meta/stats.json` value) is
    /// used only when the export has no processor files; `tokenizer` overrides the export's.
    pub fn new(
        dir: &Path,
        m: &ExportManifest,
        dataset_stats: Option<&serde_json::Value>,
        tokenizer: Option<&Path>,
    ) -> Result<Self> {
        let tok_path = match (tokenizer, &m.language.tokenizer) {
            (Some(p), _) => p.to_path_buf(),
            (None, Some(f)) => dir.join(f),
            (None, None) => {
                return Err(Error::Config(format!(
                    "{}: the export has no tokenizer.json; pass one",
                    dir.display()
                )))
            }
        };
        let pad = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["pad_token"].as_str().map(str::to_string))
            .unwrap_or_else(|| "<pad>".to_string());
        let tokenizer = TaskTokenizer::from_file(&tok_path, m.language.max_length as usize, &pad)
            .map_err(prep)?;
        let mean_std = |kind: &str| match m.normalization.get(kind).map(String::as_str) {
            Some("MEAN_STD") => Ok(true),
            Some("IDENTITY") | None => Ok(false),
            Some(other) => Err(Error::Config(format!(
                "{kind} normalization {other}: only MEAN_STD and IDENTITY are supported"
            ))),
        };
        let (norm_state, norm_action) = (mean_std("STATE")?, mean_std("ACTION")?);
        let load = |processor: &str, step: &str| -> Result<Option<Normalizer>> {
            match state_file(dir, processor, step)? {
                Some(f) => Ok(Some(Normalizer::from_file(&f).map_err(prep)?)),
                None => match dataset_stats {
                    Some(s) => Ok(Some(from_stats_json(s, &[STATE, ACTION])?)),
                    None => Ok(None),
                },
            }
        };
        let pre = if norm_state {
            Some(load("policy_preprocessor.json", "normalizer_processor")?.ok_or_else(|| {
                Error::Config(
                    "the export has no normalizer statistics: pass the dataset (its meta/stats.json)"
                        .into(),
                )
            })?)
        } else {
            None
        };
        let post = if norm_action {
            Some(
                load("policy_postprocessor.json", "unnormalizer_processor")?.ok_or_else(|| {
                    Error::Config("the export has no unnormalizer statistics".into())
                })?,
            )
        } else {
            None
        };
        Ok(Self {
            tokenizer,
            pre,
            post,
            height: m.image.height as usize,
            width: m.image.width as usize,
            pad_value: m.image.pad_value as f32,
            length: m.language.max_length as usize,
            cameras: m.cameras.len(),
            action_dim: m.action_dim as usize,
            max_action_dim: m.max_action_dim as usize,
        })
    }

    /// The graphs' inputs for one observation.
    pub fn inputs(&self, obs: &Observation<'_>) -> Result<ModelInputs> {
        if obs.images.len() != self.cameras {
            return Err(Error::Config(format!(
                "{} camera frames for an export with {} cameras",
                obs.images.len(),
                self.cameras
            )));
        }
        let mut images = Vec::with_capacity(self.cameras);
        for f in &obs.images {
            let chw = preprocess::hwc_u8_to_chw_f32(f.rgb, f.height, f.width, 3).map_err(prep)?;
            images.push(preprocess::resize_with_pad(
                &chw,
                3,
                f.height,
                f.width,
                self.height,
                self.width,
                self.pad_value,
            ));
        }
        let mut state = obs.state.to_vec();
        if let Some(n) = &self.pre {
            n.normalize(STATE, &mut state).map_err(prep)?;
        }
        if state.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite("observation.state".into()));
        }
        let (tokens, token_mask) = self.tokenizer.encode(obs.task, self.length).map_err(prep)?;
        Ok(ModelInputs {
            image_masks: vec![true; images.len()],
            images,
            tokens,
            token_mask,
            state,
        })
    }

    /// The chunk's real action dims, unnormalized: [chunk_size · action_dim].
    pub fn actions(&self, chunk: &Chunk) -> Result<Vec<f32>> {
        let mut out: Vec<f32> = chunk
            .padded
            .chunks(self.max_action_dim)
            .flat_map(|row| row[..self.action_dim].iter().copied())
            .collect();
        if let Some(n) = &self.post {
            n.unnormalize(ACTION, &mut out).map_err(prep)?;
        }
        Ok(out)
    }

    pub fn action_dim(&self) -> usize {
        self.action_dim
    }
}
