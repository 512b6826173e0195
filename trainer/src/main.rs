//! `zk0-train`: the libtorch worker of zk0 — parity checks against LeRobot fixtures
//! (`compare`), device diagnostics (`doctor`), FedProx local training (`train`), dataset
//! evaluation (`eval`), the loss of a checkpoint on one batch (`loss`) and timed training steps
//! on a fixed batch (`bench`, what `cargo xtask bench train` compares with LeRobot).
//!
//! `--model` takes a checkpoint directory or a Hugging Face Hub id (`owner/name`, resolved
//! through hf-hub's cache; `HF_HUB_OFFLINE=1` uses the cache only).

mod bench;
mod compare;
mod doctor;
mod eval;
mod pipeline;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tch::{Device, Kind};

/// The crate version and the libtorch it was built against.
fn long_version() -> &'static str {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (libtorch ",
        env!("ZK0_LIBTORCH_VERSION"),
        ")"
    )
}

#[derive(Debug, Parser)]
#[command(name = "zk0-train", version = long_version(), about = "zk0 SmolVLA training worker (libtorch)")]
struct Cli {
    /// Intra-op CPU threads for libtorch (default: all cores).
    #[arg(long, global = true, env = "ZK0_THREADS")]
    threads: Option<i32>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where and in which precision the model runs.
#[derive(Debug, Clone, Args)]
struct RunOpts {
    /// auto (CUDA when libtorch sees a GPU, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// bfloat16 autocast of the matrix products (linear layers, patch convolution); the frozen
    /// ones' weights are stored in bfloat16 (what they compute with), the trainable weights,
    /// optimizer state, norms, softmax and the loss stay float32.
    #[arg(long)]
    bf16: bool,
}

impl RunOpts {
    fn device(&self) -> Result<Device> {
        Ok(smolvla::device::parse_device(&self.device)?)
    }
    fn autocast(&self) -> Option<Kind> {
        self.bf16.then_some(Kind::BFloat16)
    }
}

/// A `--model` argument: a directory, or a Hub id resolved to its cached snapshot.
fn checkpoint(model: &str) -> Result<PathBuf> {
    smolvla::hub::resolve_checkpoint(model).with_context(|| format!("--model {model}"))
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Recompute every expected tensor of a LeRobot SmolVLA fixture and report the errors
    /// (JSON on stdout); exits 1 when any tensor is out of tolerance or not computed.
    Compare {
        /// Fixture directory (config.json, vlm_config.json, model.safetensors, inputs/expected).
        #[arg(long)]
        fixture: PathBuf,
        /// Pipeline fixture directory (dataset → processor → model), checked as well.
        #[arg(long)]
        dataset: Option<PathBuf>,
    },
    /// Run a small tensor op on every available device and print JSON.
    Doctor,
    /// Export the inference path to ONNX for the robot (`zk0-agent infer | run`): prefix and
    /// denoise graphs with external weights, `export.json`, the processor and tokenizer files.
    ExportOnnx {
        /// LeRobot SmolVLA checkpoint: a directory or a Hub id such as lerobot/smolvla_base.
        #[arg(long)]
        model: String,
        /// Weights (safetensors, LeRobot names; all or a subset, e.g. a federated global
        /// model) applied on top of the checkpoint's before export.
        #[arg(long)]
        global: Option<PathBuf>,
        /// tokenizer.json to ship with the export (default: the checkpoint's, if it has one).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Matrix products in float16 (half the weights' size; for GPUs); norms, softmax,
        /// RoPE, the time embedding and the Euler accumulation stay float32.
        #[arg(long)]
        fp16: bool,
        /// The prefix graph's linear layers (vision tower, connector, VLM) as dynamically
        /// quantized int8 products, for CPUs; the denoising expert stays float32.
        #[arg(long, conflicts_with = "fp16")]
        int8: bool,
    },
    /// Policy loss over a LeRobot dataset (every frame of all or the first N episodes, LeRobot's
    /// preprocessing, seeded noise/time); the JSON report goes to --out and stdout.
    Eval {
        /// LeRobot SmolVLA checkpoint: a directory (config.json, model.safetensors, ...) or a
        /// Hub id such as lerobot/smolvla_base.
        #[arg(long)]
        model: String,
        /// Weights (safetensors, LeRobot names; all or a subset) applied on top of the model's.
        #[arg(long)]
        global: Option<PathBuf>,
        /// LeRobot dataset directory (v3.0 or v2.1).
        #[arg(long)]
        dataset: PathBuf,
        /// tokenizer.json (default: MODEL/tokenizer.json).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Only the first N episodes (default: all).
        #[arg(long)]
        episodes: Option<usize>,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Seed of the flow-matching noise and time.
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Output: the JSON report.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        run: RunOpts,
    },
    /// Flow-matching loss of a checkpoint on a batch at the model boundary (fixture-format
    /// `inputs.safetensors`: the preprocessed batch plus `noise` and `time`); JSON on stdout.
    Loss {
        /// LeRobot SmolVLA checkpoint: a directory (config.json, model.safetensors, ...) or a
        /// Hub id such as lerobot/smolvla_base.
        #[arg(long)]
        model: String,
        /// safetensors with the batch, `noise` and `time`.
        #[arg(long)]
        inputs: PathBuf,
    },
    /// FedProx local training on a LeRobot dataset: JSON lines of progress on stdout, the
    /// trained trainable tensors or their change (safetensors) and a metrics JSON written to
    /// files.
    #[command(group(clap::ArgGroup::new("out").required(true).args(["out_params", "out_delta"])))]
    Train {
        /// LeRobot SmolVLA checkpoint: a directory (config.json, model.safetensors, ...) or a
        /// Hub id such as lerobot/smolvla_base.
        #[arg(long)]
        model: String,
        /// Global model weights (safetensors, LeRobot names; all or a subset) to start from.
        #[arg(long)]
        global: Option<PathBuf>,
        /// LeRobot dataset directory (v3.0 or v2.1).
        #[arg(long)]
        dataset: PathBuf,
        /// tokenizer.json (default: MODEL/tokenizer.json).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Learning rate (default: the config's optimizer_lr).
        #[arg(long)]
        lr: Option<f64>,
        /// FedProx proximal coefficient.
        #[arg(long, default_value_t = 0.0)]
        mu: f64,
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Output: trained trainable tensors.
        #[arg(long)]
        out_params: Option<PathBuf>,
        /// Output: the change of the trainable tensors, trained − the values they started from
        /// (those of --global where it has them): the update an agent sends.
        #[arg(long)]
        out_delta: Option<PathBuf>,
        /// Output: metrics JSON.
        #[arg(long)]
        out_metrics: PathBuf,
        /// Output: the trained policy as a LeRobot checkpoint directory (`save_pretrained`
        /// layout: config.json, model.safetensors, the model's processor files), which
        /// LeRobot's `SmolVLAPolicy.from_pretrained` loads.
        #[arg(long)]
        out_model: Option<PathBuf>,
        #[command(flatten)]
        run: RunOpts,
    },
    /// Timed training steps on one fixed batch (fixture-format inputs: the preprocessed batch
    /// plus `noise` and `time`): forward with loss, backward, grad clip, AdamW; prints one JSON
    /// line with steps/s (warmup excluded) and the process's peak RSS.
    Bench {
        /// LeRobot SmolVLA checkpoint (directory or Hub id).
        #[arg(long)]
        model: String,
        /// safetensors with the batch, `noise` and `time`.
        #[arg(long)]
        inputs: PathBuf,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first (allocator and kernel warm-up).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[command(flatten)]
        run: RunOpts,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        tch::set_num_threads(n.max(1));
    }
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("zk0-train: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    match cli.cmd {
        Cmd::Compare { fixture, dataset } => {
            let (report, ok) = compare::run(&fixture, dataset.as_ref())?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ok)
        }
        Cmd::Train {
            model,
            global,
            dataset,
            tokenizer,
            steps,
            batch_size,
            lr,
            mu,
            seed,
            out_params,
            out_delta,
            out_metrics,
            out_model,
            run,
        } => {
            let out = match (out_params, out_delta) {
                (Some(p), None) => train::TrainedOut::Params(p),
                (None, Some(d)) => train::TrainedOut::Delta(d),
                // The argument group makes exactly one of them required.
                _ => anyhow::bail!("give one of --out-params and --out-delta"),
            };
            let args = train::TrainArgs {
                model: checkpoint(&model)?,
                global,
                dataset,
                tokenizer,
                steps,
                batch_size,
                lr,
                mu,
                seed,
                out,
                out_metrics,
                out_model,
                device: run.device()?,
                autocast: run.autocast(),
            };
            let metrics = train::run(&args)?;
            println!(
                "{}",
                serde_json::json!({"event": "done", "metrics": metrics})
            );
            Ok(true)
        }
        Cmd::Eval {
            model,
            global,
            dataset,
            tokenizer,
            episodes,
            batch_size,
            seed,
            out,
            run,
        } => {
            let report = eval::run(&eval::EvalArgs {
                model: checkpoint(&model)?,
                global,
                dataset,
                tokenizer,
                episodes,
                batch_size,
                seed,
                out,
                device: run.device()?,
                autocast: run.autocast(),
            })?;
            println!("{report}");
            Ok(true)
        }
        Cmd::Loss { model, inputs } => {
            println!("{}", compare::loss(&checkpoint(&model)?, &inputs)?);
            Ok(true)
        }
        Cmd::Bench {
            model,
            inputs,
            steps,
            warmup,
            run,
        } => {
            let report = bench::run(&bench::BenchArgs {
                model: checkpoint(&model)?,
                inputs,
                steps,
                warmup,
                device: run.device()?,
                autocast: run.autocast(),
            })?;
            println!("{report}");
            Ok(true)
        }
        Cmd::ExportOnnx {
            model,
            global,
            tokenizer,
            out,
            fp16,
            int8,
        } => {
            let dir = checkpoint(&model)?;
            let started = std::time::Instant::now();
            let mut policy = smolvla::SmolVlaPolicy::from_dir(&dir, Device::Cpu)
                .with_context(|| format!("loading {}", dir.display()))?;
            if let Some(g) = &global {
                let tensors = tch::Tensor::read_safetensors(g)
                    .with_context(|| format!("--global {}", g.display()))?;
                policy.load_subset(&tensors)?;
            }
            let opts = smolvla::onnx::ExportOptions {
                fp16,
                int8,
                tokenizer,
            };
            let m = smolvla::onnx::export(&policy, Some(&dir), &model, &out, &opts)?;
            let size = |f: &str| std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0);
            println!(
                "{}",
                serde_json::json!({
                    "event": "exported",
                    "out": out,
                    "precision": m.precision,
                    "prefix_len": m.prefix_len,
                    "cameras": m.cameras.iter().map(|c| &c.key).collect::<Vec<_>>(),
                    "bytes": {
                        "prefix": size(&m.prefix.file) + size(&m.prefix.data),
                        "denoise": size(&m.denoise.file) + size(&m.denoise.data),
                    },
                    "nodes": {"prefix": m.prefix.nodes, "denoise": m.denoise.nodes},
                    "seconds": started.elapsed().as_secs_f64(),
                })
            );
            Ok(true)
        }
        Cmd::Doctor => {
            let (report, ok) = doctor::run(long_version());
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ok)
        }
    }
}
