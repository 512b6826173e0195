//! `zk0-train compare`: recompute every tensor of a LeRobot-made SmolVLA parity fixture
//! (format of `shared/fixtures/smolvla-tiny`) and report the errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use smolvla::optim::{clip_grad_norm, AdamW, AdamWConfig, CosineWithWarmup};
use smolvla::policy::{ACTION, ACTION_IS_PAD};
use smolvla::{Batch, SmolVlaPolicy, Trace};
use tch::{Device, Kind, Tensor};

/// `|ours − expected| ≤ atol + rtol·|expected|` per element.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

#[derive(Debug, Deserialize)]
struct FixtureMeta {
    tolerance: Tolerance,
    #[serde(default)]
    trainable_parameters: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ExtraMeta {
    #[serde(default)]
    full_finetune_recorded_parameters: Vec<String>,
    #[serde(default)]
    full_finetune_trainable_parameters: Vec<String>,
}

/// The schedule steps LeRobot's generator queries (a 30 000-step run).
const SCHEDULE_STEPS: [i64; 12] = [
    0, 1, 10, 500, 999, 1000, 1001, 5000, 15000, 29999, 30000, 40000,
];
const SCHEDULE_RUN: i64 = 30_000;

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .collect())
}

fn load_policy(dir: &Path) -> Result<SmolVlaPolicy> {
    SmolVlaPolicy::from_dir(dir, Device::Cpu)
        .with_context(|| format!("loading the policy from {}", dir.display()))
}

/// The policy's batch from `inputs.safetensors` (noise/time/sample_noise excluded).
pub(crate) fn batch_of(inputs: &BTreeMap<String, Tensor>) -> Batch {
    inputs
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "noise" | "time" | "sample_noise"))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect()
}

pub(crate) fn input<'a>(inputs: &'a BTreeMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    inputs
        .get(key)
        .with_context(|| format!("inputs.safetensors has no `{key}`"))
}

/// Everything of `expected.safetensors` / `expected_extra.safetensors` that this port computes.
pub fn compute_all(dir: &Path, with_extra: bool) -> Result<BTreeMap<String, Tensor>> {
    let meta: FixtureMeta = read_json(&dir.join("fixture.json"))?;
    let inputs = read_tensors(&dir.join("inputs.safetensors"))?;
    let batch = batch_of(&inputs);
    let noise = input(&inputs, "noise")?;
    let time = input(&inputs, "time")?;
    let sample_noise = input(&inputs, "sample_noise")?;
    let mut out = BTreeMap::new();

    let mut policy = load_policy(dir)?;

    // 1. Sampling with the prefix KV cache, then select_action twice.
    let obs: Batch = batch
        .iter()
        .filter(|(k, _)| k.as_str() != ACTION && k.as_str() != ACTION_IS_PAD)
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    let mut trace = Trace::on();
    let actions = policy.predict_action_chunk(&obs, Some(sample_noise), &mut trace)?;
    out.insert("sample.actions".to_string(), actions);
    out.extend(trace.tensors);
    policy.reset();
    for i in 0..2 {
        let a = policy.select_action(&obs, Some(sample_noise))?;
        out.insert(format!("select.action_step{i}"), a);
    }

    // 2. Training forward with the given noise and time (default freeze settings).
    let mut trace = Trace::on();
    let lo = policy.forward(&batch, Some(noise), Some(time), &mut trace)?;
    out.insert("train.loss".into(), lo.loss.detach().reshape([1]));
    out.insert("train.per_sample_loss".into(), lo.per_sample.detach());
    out.insert("train.v_t".into(), lo.flow.v_t.detach());
    out.insert("train.u_t".into(), lo.flow.u_t.detach());
    out.extend(trace.tensors);

    // 3. Backward, clip to the preset's norm, one AdamW step at the base LR.
    let trainable = policy.trainable_parameters();
    let names: Vec<&String> = trainable.iter().map(|(n, _)| n).collect();
    if !meta.trainable_parameters.is_empty() {
        let mut ours: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let mut theirs: Vec<&str> = meta
            .trainable_parameters
            .iter()
            .map(|s| s.as_str())
            .collect();
        ours.sort();
        theirs.sort();
        if ours != theirs {
            bail!("trainable set differs from fixture.json: ours {ours:?}, LeRobot {theirs:?}");
        }
    }
    lo.loss.backward();
    for (n, p) in &trainable {
        let g = p.grad();
        if g.defined() {
            out.insert(format!("grad.{n}"), g.copy());
        }
    }
    let params: Vec<Tensor> = trainable.iter().map(|(_, p)| p.shallow_clone()).collect();
    let gn = clip_grad_norm(&params, policy.config.optimizer_grad_clip_norm);
    out.insert("train.grad_norm".into(), gn.reshape([1]));
    let acfg = AdamWConfig::from_policy(&policy.config);
    let mut opt = AdamW::new(params, acfg);
    opt.step(acfg.lr);
    for (n, p) in &trainable {
        out.insert(format!("updated.{n}"), p.detach().copy());
    }

    // 4. The preset's LR schedule.
    let sched = CosineWithWarmup::from_policy(&policy.config);
    out.insert("schedule.steps".into(), Tensor::from_slice(&SCHEDULE_STEPS));
    let lrs: Vec<f64> = SCHEDULE_STEPS
        .iter()
        .map(|&s| sched.lr(s, SCHEDULE_RUN))
        .collect();
    out.insert("schedule.lr".into(), Tensor::from_slice(&lrs));

    // 5. Full fine-tune: vision tower, connector and VLM layers trainable.
    if with_extra {
        let extra: ExtraMeta = read_json(&dir.join("extra.json"))?;
        let mut full = load_policy(dir)?;
        full.config.freeze_vision_encoder = false;
        full.config.train_expert_only = false;
        full.apply_freeze();
        let trainable = full.trainable_parameters();
        if !extra.full_finetune_trainable_parameters.is_empty() {
            let mut ours: Vec<&str> = trainable.iter().map(|(n, _)| n.as_str()).collect();
            let mut theirs: Vec<&str> = extra
                .full_finetune_trainable_parameters
                .iter()
                .map(|s| s.as_str())
                .collect();
            ours.sort();
            theirs.sort();
            if ours != theirs {
                bail!("full fine-tune trainable set differs from extra.json: ours {ours:?}, LeRobot {theirs:?}");
            }
        }
        let lo = full.forward(&batch, Some(noise), Some(time), &mut Trace::off())?;
        out.insert("full.loss".into(), lo.loss.detach().reshape([1]));
        lo.loss.backward();
        let named: BTreeMap<&str, &Tensor> =
            trainable.iter().map(|(n, p)| (n.as_str(), p)).collect();
        for n in &extra.full_finetune_recorded_parameters {
            if let Some(p) = named.get(n.as_str()) {
                let g = p.grad();
                if g.defined() {
                    out.insert(format!("full.grad.{n}"), g.copy());
                }
            }
        }
        let params: Vec<Tensor> = trainable.iter().map(|(_, p)| p.shallow_clone()).collect();
        let gn = clip_grad_norm(&params, full.config.optimizer_grad_clip_norm);
        out.insert("full.grad_norm".into(), gn.reshape([1]));
        let acfg = AdamWConfig::from_policy(&full.config);
        let mut opt = AdamW::new(params, acfg);
        opt.step(acfg.lr);
        for n in &extra.full_finetune_recorded_parameters {
            if let Some(p) = named.get(n.as_str()) {
                out.insert(format!("full.updated.{n}"), p.detach().copy());
            }
        }
    }
    Ok(out)
}

/// Error statistics of one tensor.
pub fn compare_tensor(
    name: &str,
    ours: Option<&Tensor>,
    expected: &Tensor,
    tol: Tolerance,
) -> Value {
    let Some(ours) = ours else {
        return json!({"name": name, "shape": expected.size(), "pass": false, "error": "not computed"});
    };
    if ours.size() != expected.size() {
        return json!({"name": name, "shape": expected.size(), "pass": false,
            "error": format!("shape {:?}, expected {:?}", ours.size(), expected.size())});
    }
    let a = ours.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    if a.numel() == 0 {
        return json!({"name": name, "shape": expected.size(), "max_abs_err": 0.0, "max_rel_err": 0.0, "pass": true});
    }
    let diff = (&a - &e).abs();
    let max_abs = diff.max().double_value(&[]);
    let rel = &diff / e.abs().clamp_min(f64::MIN_POSITIVE);
    let max_rel = rel.max().double_value(&[]);
    let bound = e.abs() * tol.rtol + tol.atol;
    let pass = diff.le_tensor(&bound).all().int64_value(&[]) == 1 && max_abs.is_finite();
    json!({"name": name, "shape": expected.size(), "max_abs_err": max_abs, "max_rel_err": max_rel, "pass": pass})
}

/// Runs the comparison and returns (report, all passed).
pub fn run(fixture: &Path, dataset: Option<&PathBuf>) -> Result<(Value, bool)> {
    let meta: FixtureMeta = read_json(&fixture.join("fixture.json"))?;
    let tol = meta.tolerance;
    let extra_path = fixture.join("expected_extra.safetensors");
    let with_extra = extra_path.exists();
    let computed = compute_all(fixture, with_extra)?;
    let mut rows = Vec::new();
    let mut files = vec![("expected.safetensors", fixture.join("expected.safetensors"))];
    if with_extra {
        files.push(("expected_extra.safetensors", extra_path));
    }
    for (file, path) in &files {
        let expected = read_tensors(path)?;
        for (name, e) in &expected {
            let mut row = compare_tensor(name, computed.get(name), e, tol);
            row["file"] = json!(file);
            rows.push(row);
        }
    }
    let mut report = json!({
        "fixture": fixture.display().to_string(),
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
    });
    if let Some(ds) = dataset {
        let (prow, ptol) = crate::pipeline::run(fixture, ds)?;
        report["pipeline_tolerance"] = ptol;
        rows.extend(prow);
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| r["pass"] != json!(true))
        .filter_map(|r| r["name"].as_str())
        .collect();
    let ok = failed.is_empty();
    report["checked"] = json!(rows.len());
    report["failed"] = json!(failed);
    report["pass"] = json!(ok);
    report["tensors"] = json!(rows);
    Ok((report, ok))
}

/// `zk0-train loss`: the flow-matching loss of the checkpoint in `model` on a batch at the model
/// boundary (`inputs.safetensors` in the fixture format: the batch plus the `noise` and `time`
/// to use). The same number LeRobot's `SmolVLAPolicy.forward(batch, noise, time)` gives.
pub fn loss(model: &Path, inputs: &Path) -> Result<Value> {
    let policy = load_policy(model)?;
    let inputs = read_tensors(inputs)?;
    let batch = batch_of(&inputs);
    let (noise, time) = (input(&inputs, "noise")?, input(&inputs, "time")?);
    let out = tch::no_grad(|| policy.forward(&batch, Some(noise), Some(time), &mut Trace::off()))?;
    Ok(json!({
        "loss": out.loss.double_value(&[]),
        "per_sample_loss": Vec::<f64>::try_from(&out.per_sample.to_kind(Kind::Double))?,
    }))
}
