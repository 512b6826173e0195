//! `--only round`: a local round end to end, `zk0-train train` against LeRobot's `lerobot-train`
//! on the same generated dataset, the same checkpoint, steps, batch size and learning rate.
//!
//! The dataset is real-shaped: `lerobot_dataset::synth` (what `zk0-agent dataset synth` writes),
//! two SO-100 cameras `front` and `wrist` at 640×480, AV1 (libsvtav1, LeRobot's default codec and
//! settings), `--round-episodes` × `--round-frames` at 30 fps; generated once under the target
//! dir's tmp folder (or `--round-dataset DIR`) and reused. The checkpoint declares both cameras at
//! 3×480×640; each side resizes them with padding to the config's `resize_imgs_with_padding`
//! inside the policy. Its processor files (LeRobot's SmolVLA preprocessor with the dataset's
//! statistics) and the tiny fixture's tokenizer sit in the checkpoint dir, so both sides
//! normalize and tokenize alike.
//!
//! Each side is one process, timed from spawn to exit, its process tree's memory sampled (RSS
//! and PSS summed over the process and its children: LeRobot's dataloader workers are
//! processes). The training loop's time is the sum of each step's `data_s` (batch read, decoded
//! and preprocessed) and `update_s` (forward, backward, clip, AdamW), from zk0-train's step lines
//! and from `lerobot-train`'s own log at `--log_freq=1` (its `data_s` / `updt_s` timers around the
//! same two parts); start-up is the process time outside that loop.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use smolvla::processor::Stats;
use smolvla::SmolVlaConfig;

use super::{common, read_json, write_json, Opts, FIXTURE};

const LEROBOT_LAUNCHER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/lerobot_round.py");
/// The tokenizer both sides use (SmolVLM2's is not vendored; any ids below the vocabulary fit).
const TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/smolvla-tiny/pipeline/tokenizer.json"
);
const CAMERAS: [&str; 2] = ["front", "wrist"];
const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
/// The learning rate of both sides (SmolVLA's preset).
const LR: &str = "1e-4";

/// The generated dataset, made once (a `complete` marker is written after the last episode).
fn dataset(opts: &Opts) -> PathBuf {
    let dir = opts.round_dataset.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "zk0-bench-round-{}x{}-2x{WIDTH}x{HEIGHT}-av1",
            opts.round_episodes, opts.round_frames
        ))
    });
    let marker = dir.join("complete");
    if marker.is_file() {
        return dir;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!(
        "generating {} ({} episodes x {} frames, 2 cameras {WIDTH}x{HEIGHT} AV1) ...",
        dir.display(),
        opts.round_episodes,
        opts.round_frames
    );
    let t = std::time::Instant::now();
    let cfg = lerobot_dataset::synth::SynthConfig {
        episodes: opts.round_episodes,
        frames_per_episode: opts.round_frames,
        cameras: CAMERAS
            .iter()
            .map(|c| (c.to_string(), WIDTH, HEIGHT))
            .collect(),
        seed: 0,
        // LeRobot's defaults: libsvtav1, preset 12, crf 30, g 2, yuv420p.
        encoder: lerobot_dataset::video::EncoderConfig::default(),
        ..Default::default()
    };
    lerobot_dataset::synth::generate(&dir, &cfg).unwrap();
    std::fs::write(&marker, b"").unwrap();
    println!("  generated in {:.0} s", t.elapsed().as_secs_f64());
    dir
}

/// The round's checkpoint: `src`'s backbone and weights (hard-linked) with a config declaring the
/// two 480×640 cameras, the processors with `dataset`'s statistics and the tokenizer.
fn checkpoint(src: &Path, dir: &Path, dataset: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = read_json(&src.join("config.json"));
    let mut inputs = serde_json::Map::new();
    inputs.insert(
        "observation.state".into(),
        cfg["input_features"]["observation.state"].clone(),
    );
    for c in CAMERAS {
        inputs.insert(
            format!("observation.images.{c}"),
            json!({"type": "VISUAL", "shape": [3, HEIGHT, WIDTH]}),
        );
    }
    cfg["input_features"] = Value::Object(inputs);
    cfg["device"] = json!("cpu");
    write_json(&dir.join("config.json"), &cfg);
    std::fs::copy(src.join("vlm_config.json"), dir.join("vlm_config.json")).unwrap();
    std::fs::copy(TOKENIZER, dir.join("tokenizer.json")).unwrap();
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        std::fs::hard_link(src.join("model.safetensors"), &weights)
            .or_else(|_| std::fs::copy(src.join("model.safetensors"), &weights).map(|_| ()))
            .unwrap();
    }
    let ds = lerobot_dataset::LeRobotDataset::open(dataset).unwrap();
    let stats = Stats::from_stats_json(ds.stats().expect("the synth writes meta/stats.json"));
    let config = SmolVlaConfig::from_file(dir.join("config.json")).unwrap();
    smolvla::processor::save_processors(dir, &config, &stats).unwrap();
    dir.to_path_buf()
}

/// One side's figures.
struct Run {
    side: String,
    /// Per step: (data_s, update_s).
    steps: Vec<(f64, f64)>,
    wall_s: f64,
    peak_rss_kib: u64,
    peak_pss_kib: u64,
    first_loss: f64,
    last_loss: f64,
}

impl Run {
    fn loop_s(&self) -> f64 {
        self.steps.iter().map(|(d, u)| d + u).sum()
    }
    /// Samples/s over all steps, and over the steps after the first (warm decoders, workers up).
    fn samples_per_s(&self, batch: usize) -> (f64, f64) {
        let n = self.steps.len();
        let rest: f64 = self.steps.iter().skip(1).map(|(d, u)| d + u).sum();
        (
            (n * batch) as f64 / self.loop_s(),
            ((n - 1) * batch) as f64 / rest,
        )
    }
    fn ms(&self, part: usize) -> f64 {
        let sum: f64 = self
            .steps
            .iter()
            .map(|s| if part == 0 { s.0 } else { s.1 })
            .sum();
        sum * 1000.0 / self.steps.len() as f64
    }
}

/// `key:value` of a `lerobot-train` log line (`... loss:0.954 grdn:1.2 lr:1.0e-05 updt_s:0.101 data_s:0.034 ...`).
fn log_value(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

fn zk0(opts: &Opts, model: &Path, dataset: &Path, work: &Path) -> Result<Run, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zk0-train"));
    cmd.arg("--threads")
        .arg(opts.threads.to_string())
        .args(["train", "--model"])
        .arg(model)
        .arg("--tokenizer")
        .arg(model.join("tokenizer.json"))
        .arg("--dataset")
        .arg(dataset)
        .args(["--steps", &opts.round_steps.to_string()])
        .args(["--batch-size", &opts.round_batch.to_string()])
        .args(["--lr", LR, "--mu", "0", "--seed", "0", "--device", "cpu"])
        .arg("--out-params")
        .arg(work.join("zk0-params.safetensors"))
        .arg("--out-metrics")
        .arg(work.join("zk0-metrics.json"));
    let m = common::run_measured(cmd, "zk0-train train")?;
    if !m.status.success() {
        return Err(format!(
            "zk0-train train failed ({}):\n{}",
            m.status, m.stderr
        ));
    }
    let lines: Vec<Value> = m
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .collect();
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Run {
        side: "zk0".into(),
        steps: lines
            .iter()
            .map(|v| (f(v, "data_s"), f(v, "update_s")))
            .collect(),
        wall_s: m.wall_s,
        peak_rss_kib: m.peak_rss_kib,
        peak_pss_kib: m.peak_pss_kib,
        first_loss: lines.first().map_or(f64::NAN, |v| f(v, "loss")),
        last_loss: lines.last().map_or(f64::NAN, |v| f(v, "loss")),
    })
}

fn lerobot(
    opts: &Opts,
    python: &Path,
    workers: usize,
    model: &Path,
    dataset: &Path,
    work: &Path,
) -> Result<Run, String> {
    let out_dir = work.join(format!("lerobot-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let mut cmd = Command::new(python);
    cmd.arg(LEROBOT_LAUNCHER)
        .arg("--model")
        .arg(model)
        .args(["--threads", &opts.threads.to_string(), "--"])
        .arg(format!("--policy.path={}", model.display()))
        .args([
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            &format!("--policy.optimizer_lr={LR}"),
            "--dataset.repo_id=local/round",
        ])
        .arg(format!("--dataset.root={}", dataset.display()))
        .args([
            format!("--steps={}", opts.round_steps),
            format!("--batch_size={}", opts.round_batch),
            format!("--num_workers={workers}"),
        ])
        .args([
            "--seed=0",
            "--log_freq=1",
            "--save_checkpoint=false",
            "--wandb.enable=false",
        ])
        .arg(format!("--output_dir={}", out_dir.display()))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HOME", work.join("hf"));
    let m = common::run_measured(cmd, "lerobot-train")?;
    let _ = std::fs::remove_dir_all(&out_dir);
    let log = format!("{}\n{}", m.stdout, m.stderr);
    if !m.status.success() {
        return Err(format!("lerobot-train failed ({}):\n{log}", m.status));
    }
    let steps: Vec<(f64, f64, f64)> = log
        .lines()
        .filter_map(|l| {
            Some((
                log_value(l, "data_s:")?,
                log_value(l, "updt_s:")?,
                log_value(l, "loss:")?,
            ))
        })
        .collect();
    if steps.len() != opts.round_steps {
        return Err(format!(
            "lerobot-train logged {} steps, not {}:\n{log}",
            steps.len(),
            opts.round_steps
        ));
    }
    Ok(Run {
        side: format!("lerobot w{workers}"),
        steps: steps.iter().map(|s| (s.0, s.1)).collect(),
        wall_s: m.wall_s,
        peak_rss_kib: m.peak_rss_kib,
        peak_pss_kib: m.peak_pss_kib,
        first_loss: steps.first().map_or(f64::NAN, |s| s.2),
        last_loss: steps.last().map_or(f64::NAN, |s| s.2),
    })
}

fn row(r: &Run, batch: usize) {
    let (all, warm) = r.samples_per_s(batch);
    println!(
        "{:11} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>8.1} {:>8.2} {:>8.2} {:>9.0} {:>9.0} {:>8.4} {:>8.4}",
        r.side,
        all,
        warm,
        r.loop_s(),
        r.ms(0),
        r.ms(1),
        r.wall_s,
        r.wall_s - r.loop_s(),
        r.peak_rss_kib as f64 / 1024.0,
        r.peak_pss_kib as f64 / 1024.0,
        r.first_loss,
        r.last_loss,
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the round case: `python` is LeRobot's interpreter, when there is one. Returns false when
/// a side failed.
pub fn run(opts: &Opts, root: &Path, python: Option<&Path>) -> bool {
    let dataset = dataset(opts);
    let (src, label) = match opts.round_model.as_str() {
        "tiny" => (PathBuf::from(FIXTURE), "tiny fixture (64x64 images)"),
        "small" => (
            super::small(root, 1).dir,
            "small: quarter-width SmolVLA, 256x256 images",
        ),
        _ => (
            super::full(root, CAMERAS.len(), 1, 1).dir,
            "full: smolvla_base architecture, random weights, 512x512 images",
        ),
    };
    let model = checkpoint(
        &src,
        &root.join(format!("round-{}", opts.round_model)),
        &dataset,
    );
    let work = root.join("round-work");
    std::fs::create_dir_all(&work).unwrap();
    println!(
        "round: {} steps x batch {} (lr {LR}, zk0 mu 0), model {label}, {} thread(s); dataset {} \
         ({} episodes x {} frames, cameras {} at {WIDTH}x{HEIGHT}, AV1)",
        opts.round_steps,
        opts.round_batch,
        opts.threads,
        dataset.display(),
        opts.round_episodes,
        opts.round_frames,
        CAMERAS.join(" + "),
    );
    println!(
        "LeRobot: lerobot-train's main() (trainer/benches/lerobot_round.py), offline, no eval, no \
         checkpoint; num_workers {:?}; zk0-train reads batches ahead on one background thread",
        opts.workers
    );
    println!(
        "samples/s = steps x batch / training-loop time (sum of per-step data_s + update_s); \
         warm = without the first step; start-up = process wall - loop; memory: process tree, \
         sampled every 100 ms"
    );
    println!(
        "{:11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8}",
        "side",
        "smp/s",
        "warm",
        "loop s",
        "data ms",
        "updt ms",
        "wall s",
        "start s",
        "RSS MiB",
        "PSS MiB",
        "loss 1",
        "loss N"
    );
    let mut sides: Vec<Option<usize>> = vec![None];
    if python.is_some() {
        sides.extend(opts.workers.iter().map(|&w| Some(w)));
    }
    let mut runs: Vec<Run> = Vec::new();
    let mut ok = true;
    for rep in 0..opts.round_runs {
        let mut order = sides.clone();
        // Alternate which side goes first, so a load change does not always hit the same side.
        if rep % 2 == 1 {
            order.reverse();
        }
        for who in order {
            let r = match (who, python) {
                (Some(w), Some(py)) => lerobot(opts, py, w, &model, &dataset, &work),
                _ => zk0(opts, &model, &dataset, &work),
            };
            match r {
                Ok(r) => {
                    row(&r, opts.round_batch);
                    runs.push(r);
                }
                Err(e) => {
                    eprintln!("{e}");
                    ok = false;
                }
            }
        }
    }
    let med = |side: &str, f: &dyn Fn(&Run) -> f64| {
        median(runs.iter().filter(|r| r.side == side).map(f).collect())
    };
    let b = opts.round_batch;
    for w in opts.workers.iter().filter(|_| python.is_some()) {
        let them = format!("lerobot w{w}");
        if !runs.iter().any(|r| r.side == them) || !runs.iter().any(|r| r.side == "zk0") {
            continue;
        }
        let ratio = |f: &dyn Fn(&Run) -> f64| med("zk0", f) / med(&them, f);
        println!(
            "zk0 / LeRobot (num_workers {w}), medians of {} run(s): samples/s {:.2}x (warm {:.2}x, \
             goal >= 1.5x), process wall time {:.2}x, peak RSS {:.2}x, peak PSS {:.2}x",
            opts.round_runs,
            ratio(&|r| r.samples_per_s(b).0),
            ratio(&|r| r.samples_per_s(b).1),
            ratio(&|r| r.wall_s),
            ratio(&|r| r.peak_rss_kib as f64),
            ratio(&|r| r.peak_pss_kib as f64),
        );
    }
    ok
}
