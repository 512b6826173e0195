//! `zk0-train compare --dataset DIR`: the pipeline fixture (format of
//! `shared/fixtures/smolvla-tiny/pipeline`): raw dataset items → LeRobot's SmolVLA preprocessor
//! (newline + tokenization, MEAN_STD normalization) → loss and sampled actions → postprocessor
//! (unnormalize). Raw camera frames, states and action chunks are read from the fixture's
//! `inputs.safetensors` (`raw.*`, as LeRobot's dataset produced them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use smolvla::policy::{ACTION, ACTION_IS_PAD, OBS_STATE, OBS_TOKENS, OBS_TOKEN_MASK};
use smolvla::processor::{Stats, TaskTokenizer};
use smolvla::{Batch, SmolVlaPolicy, Trace};
use tch::{Device, Tensor};

use crate::compare::{compare_tensor, read_json, read_tensors, Tolerance};

#[derive(Debug, Deserialize)]
struct PipelineTolerance {
    atol: f64,
    rtol: f64,
    images_atol: f64,
}

#[derive(Debug, Deserialize)]
struct PipelineMeta {
    tasks: Vec<String>,
    tokenizer_max_length: usize,
    tolerance: PipelineTolerance,
}

#[derive(Debug, Deserialize)]
struct ProcessorStep {
    registry_name: String,
    #[serde(default)]
    state_file: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ProcessorFile {
    steps: Vec<ProcessorStep>,
}

/// The statistics file of the (un)normalizer step of a saved LeRobot processor.
pub(crate) fn stats_of(dir: &Path, processor: &str, step: &str) -> Result<Stats> {
    let p: ProcessorFile = read_json(&dir.join(processor))?;
    let file = p
        .steps
        .iter()
        .find(|s| s.registry_name == step)
        .and_then(|s| s.state_file.clone())
        .with_context(|| format!("{processor} has no {step} step with a state file"))?;
    Stats::from_safetensors(&dir.join(&file)).with_context(|| format!("reading {file}"))
}

/// The pad token of the checkpoint's tokenizer (`tokenizer_config.json`), `<pad>` otherwise.
pub(crate) fn pad_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v["pad_token"].as_str().map(str::to_string))
        .unwrap_or_else(|| "<pad>".to_string())
}

/// Checks the pipeline fixture in `dir`; its model is `dir/model` when present, else `fixture`.
/// Returns the report rows (names prefixed `pipeline.`) and the tolerances used.
pub fn run(fixture: &Path, dir: &Path) -> Result<(Vec<Value>, Value)> {
    let meta: PipelineMeta = read_json(&dir.join("pipeline.json"))?;
    let tol = Tolerance {
        atol: meta.tolerance.atol,
        rtol: meta.tolerance.rtol,
    };
    let img_tol = Tolerance {
        atol: meta.tolerance.images_atol,
        rtol: 0.0,
    };
    let model_dir: PathBuf = if dir.join("model").join("config.json").exists() {
        dir.join("model")
    } else {
        fixture.into()
    };
    let policy = SmolVlaPolicy::from_dir(&model_dir, Device::Cpu)
        .with_context(|| format!("loading the policy from {}", model_dir.display()))?;
    let raw = read_tensors(&dir.join("inputs.safetensors"))?;
    let expected = read_tensors(&dir.join("expected.safetensors"))?;
    let pre = stats_of(dir, "policy_preprocessor.json", "normalizer_processor")?;
    let post = stats_of(dir, "policy_postprocessor.json", "unnormalizer_processor")?;
    let tok = TaskTokenizer::from_file(
        &dir.join("tokenizer.json"),
        meta.tokenizer_max_length,
        &pad_token(dir),
    )?;

    let get = |k: &str| {
        raw.get(k)
            .with_context(|| format!("inputs.safetensors has no `{k}`"))
    };
    let mut batch: Batch = BTreeMap::new();
    for key in policy.config.image_keys() {
        if let Some(img) = raw.get(&format!("raw.{key}")) {
            batch.insert(key.clone(), img.shallow_clone()); // VISUAL: IDENTITY
        }
    }
    batch.insert(
        OBS_STATE.into(),
        pre.normalize(OBS_STATE, get("raw.observation.state")?)?,
    );
    batch.insert(ACTION.into(), pre.normalize(ACTION, get("raw.action")?)?);
    batch.insert(
        ACTION_IS_PAD.into(),
        get("raw.action_is_pad")?.shallow_clone(),
    );
    let (tokens, mask) = tok.encode(&meta.tasks)?;
    batch.insert(OBS_TOKENS.into(), tokens);
    batch.insert(OBS_TOKEN_MASK.into(), mask);

    let mut computed: BTreeMap<String, Tensor> = batch
        .iter()
        .map(|(k, v)| (format!("batch.{k}"), v.shallow_clone()))
        .collect();
    let lo = policy.forward(
        &batch,
        Some(get("noise")?),
        Some(get("time")?),
        &mut Trace::off(),
    )?;
    computed.insert("train.loss".into(), lo.loss.detach().reshape([1]));
    let obs: Batch = batch
        .iter()
        .filter(|(k, _)| k.as_str() != ACTION && k.as_str() != ACTION_IS_PAD)
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    let actions =
        policy.predict_action_chunk(&obs, Some(get("sample_noise")?), &mut Trace::off())?;
    computed.insert("sample.actions".into(), post.unnormalize(ACTION, &actions)?);
    computed.insert("sample.actions_normalized".into(), actions);

    let rows = expected
        .iter()
        .map(|(name, e)| {
            let t = if name.starts_with("batch.observation.images.") {
                img_tol
            } else {
                tol
            };
            let mut row = compare_tensor(name, computed.get(name), e, t);
            row["name"] = json!(format!("pipeline.{name}"));
            row["file"] = json!("pipeline/expected.safetensors");
            row
        })
        .collect();
    let tol_json = json!({"atol": tol.atol, "rtol": tol.rtol, "images_atol": img_tol.atol});
    Ok((rows, tol_json))
}
