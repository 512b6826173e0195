//! `zk0-fake-eval`: a TEST-ONLY stand-in for `zk0-train eval` (no libtorch), for the run-output
//! tests of the aggregator's server evaluation.
//!
//! It takes `zk0-train eval`'s arguments (`[--threads N] eval --model <dir> --global <file>
//! --dataset <dir> [--episodes N] [--batch-size B] [--seed S] [--tokenizer T] --out <file>`),
//! checks that the model directory holds a `config.json` and that the dataset exists, and
//! writes a report whose `loss` is the mean square of every value in `--global`: a real
//! function of the evaluated model that a test can recompute. `<dataset>/fail` makes it exit
//! with an error; `<dataset>/sleep_ms` (a number) makes it take that long first, so a test can
//! act while the aggregator closes a round.

use std::path::PathBuf;

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let mut it = std::env::args().skip(1).peekable();
    if it.peek().map(String::as_str) == Some("--threads") {
        it.next();
        it.next();
    }
    anyhow::ensure!(
        it.next().as_deref() == Some("eval"),
        "usage: zk0-fake-eval eval --model … (see module docs)"
    );
    let (mut model, mut global, mut dataset, mut out) = (None, None, None, None);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--model" => model = Some(PathBuf::from(v)),
            "--global" => global = Some(PathBuf::from(v)),
            "--dataset" => dataset = Some(PathBuf::from(v)),
            "--out" => out = Some(PathBuf::from(v)),
            "--episodes" | "--batch-size" | "--seed" | "--tokenizer" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let model = model.context("--model is required")?;
    let dataset = dataset.context("--dataset is required")?;
    anyhow::ensure!(
        model.join("config.json").is_file(),
        "{} has no config.json",
        model.display()
    );
    anyhow::ensure!(dataset.is_dir(), "{} is not a directory", dataset.display());
    anyhow::ensure!(
        !dataset.join("fail").exists(),
        "dataset asks this worker to fail"
    );
    if let Ok(ms) = std::fs::read_to_string(dataset.join("sleep_ms")) {
        let ms: u64 = ms.trim().parse().context("sleep_ms")?;
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let global = global.context("--global is required")?;
    let bytes = std::fs::read(&global).with_context(|| format!("reading {}", global.display()))?;
    let (set, _) = shared_proto::tensor::read_safetensors(&bytes)?;
    let (mut sum, mut n) = (0.0f64, 0usize);
    for t in set.values() {
        for x in &t.data {
            sum += f64::from(*x) * f64::from(*x);
            n += 1;
        }
    }
    let report = serde_json::json!({
        "loss": sum / n.max(1) as f64,
        "frames": n,
        "episodes": 1,
    });
    let out = out.context("--out is required")?;
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{report}");
    Ok(())
}
