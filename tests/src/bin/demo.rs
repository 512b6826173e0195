//! `zk0-demo`: a whole federation on one machine, with the real worker (`cargo xtask demo`).
//!
//! A thin orchestrator of the real binaries, found next to this one: it generates three
//! SO-100-like datasets (different seeds and sizes) and a held-out one with `zk0-agent dataset
//! synth`, initialises `zk0-aggregator` with the trainable tensors of a LeRobot SmolVLA
//! checkpoint (the vendored tiny one by default, `--model DIR` for another), serves it with its
//! embedded broker on a free loopback port (plain MQTT), runs three `zk0-agent run` daemons
//! whose worker is `zk0-train train`, and follows the rounds. The aggregator itself evaluates
//! every global model on the held-out dataset (`zk0-train eval`), writes the per-round records,
//! the policy-loss history, plots and LeRobot checkpoints with a model card; the demo then
//! checks that `zk0-train eval` loads the final checkpoint and gives the server's final loss,
//! exports it to ONNX and runs it with `zk0-agent infer` on a held-out episode,
//! and prints where everything is with a per-round table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::Value;
use zk0_e2e::smolvla;

#[derive(Debug, Parser)]
#[command(
    name = "zk0-demo",
    about = "Run a local zk0 federation: aggregator + 3 agents training SmolVLA with zk0-train"
)]
struct Args {
    /// Rounds to run.
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// LeRobot SmolVLA checkpoint: a directory (config.json, model.safetensors, …) or a Hub id
    /// such as `lerobot/smolvla_base` in the local Hugging Face cache (`hf download
    /// lerobot/smolvla_base` first; HF_HOME / HF_HUB_CACHE honoured). Default: the vendored
    /// tiny SmolVLA (tests/fixtures/smolvla-tiny).
    #[arg(long)]
    model: Option<String>,
    /// tokenizer.json (default: MODEL/tokenizer.json, or the tiny model's own).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Run directory (default: ./zk0-demo-run-<unix time>).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Local training steps per round.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    #[arg(long, default_value_t = 8)]
    batch_size: u32,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// FedProx proximal coefficient.
    #[arg(long, default_value_t = 0.01)]
    mu: f64,
    /// Frames per generated episode.
    #[arg(long, default_value_t = 40)]
    frames: usize,
    /// libtorch threads per worker (three agents train at once).
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Write a checkpoint every N rounds (and always after the last).
    #[arg(long, default_value_t = 2)]
    checkpoint_every: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
}

/// (client id, dataset seed, episodes, codec).
const CLIENTS: [(&str, u64, usize, &str); 3] = [
    ("so100-a", 1, 3, "int8"),
    ("so100-b", 2, 4, "bf16"),
    ("so100-c", 3, 5, "f32"),
];

/// A child process killed when dropped (the demo never leaves daemons behind).
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let f = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .env("NO_COLOR", "1");
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

struct Demo {
    t0: Instant,
    bin_dir: PathBuf,
}

impl Demo {
    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    }

    fn log(&self, msg: impl AsRef<str>) {
        let t = self.t0.elapsed().as_secs_f64();
        eprintln!(
            "[{:>4}:{:04.1}] {}",
            (t / 60.0) as u64,
            t % 60.0,
            msg.as_ref()
        );
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let exe = std::env::current_exe()?;
    let demo = Demo {
        t0: Instant::now(),
        bin_dir: exe.parent().context("binary dir")?.to_path_buf(),
    };
    for b in ["zk0-aggregator", "zk0-agent", "zk0-train"] {
        anyhow::ensure!(
            demo.bin(b).is_file(),
            "{} not found next to zk0-demo (build with `cargo build --bins`)",
            demo.bin(b).display()
        );
    }
    smolvla::check_runnable(&demo.bin("zk0-train")).map_err(|e| anyhow::anyhow!(e))?;

    let model = match &args.model {
        Some(m) => resolve_model(m)?,
        None => smolvla::tiny_model_dir(),
    };
    let tokenizer = match (&args.tokenizer, &args.model) {
        (Some(t), _) => Some(std::path::absolute(t)?),
        (None, None) => Some(smolvla::tiny_tokenizer()),
        (None, Some(_)) => None, // zk0-train's default: MODEL/tokenizer.json
    };
    anyhow::ensure!(
        model.join("config.json").is_file(),
        "{} is not a LeRobot checkpoint directory (no config.json)",
        model.display()
    );
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => PathBuf::from(format!(
            "zk0-demo-run-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
        )),
    };
    anyhow::ensure!(
        !dir.exists() || std::fs::read_dir(&dir)?.next().is_none(),
        "{} exists and is not empty",
        dir.display()
    );
    std::fs::create_dir_all(dir.join("logs"))?;
    let dir = std::path::absolute(&dir)?;
    let state = dir.join("aggregator");
    demo.log(format!(
        "zk0 demo: {} rounds, model {}, run dir {}",
        args.rounds,
        model.display(),
        dir.display()
    ));

    // 1. Datasets.
    let cameras = smolvla::cameras_of(&model)?;
    let agent_bin = demo.bin("zk0-agent");
    let mut datasets = BTreeMap::new();
    for (cid, seed, episodes, _) in CLIENTS {
        let ds = smolvla::synth_dataset(
            &agent_bin,
            &dir.join("datasets").join(cid),
            &cameras,
            seed,
            episodes,
            args.frames,
        )?;
        demo.log(format!(
            "dataset {cid}: {episodes} episodes × {} frames, cameras {cameras:?}",
            args.frames
        ));
        datasets.insert(cid, ds);
    }
    let heldout = smolvla::synth_dataset(
        &agent_bin,
        &dir.join("datasets").join("heldout"),
        &cameras,
        99,
        2,
        args.frames,
    )?;
    demo.log("held-out dataset: 2 episodes (seed 99)");

    // 2. Aggregator state: the checkpoint's trainable tensors, keys, enrollment.
    let initial_path = dir.join("initial_trainable.safetensors");
    let initial = smolvla::extract_trainable(
        &demo.bin("zk0-train"),
        &model,
        tokenizer.as_deref(),
        &heldout,
        &initial_path,
    )?;
    let params: usize = initial.values().map(|t| t.data.len()).sum();
    demo.log(format!(
        "global model: {} trainable tensors, {params} parameters",
        initial.len()
    ));
    let run = |cmd: &mut Command| zk0_e2e::run_ok(cmd).map(|_| ());
    let agg = demo.bin("zk0-aggregator");
    run(Command::new(&agg)
        .arg("--state-dir")
        .arg(&state)
        .args(["init", "--model"])
        .arg(&initial_path))?;
    for (cid, _, _, _) in CLIENTS {
        let key = dir.join("agents").join(cid).join("agent.key");
        run(Command::new(&agent_bin)
            .args(["keys", "init", "--key"])
            .arg(&key))?;
        let mut pubkey = key.clone().into_os_string();
        pubkey.push(".pub");
        run(Command::new(&agg)
            .arg("--state-dir")
            .arg(&state)
            .args(["keys", "enroll", "--client-id", cid])
            .arg(pubkey))?;
    }

    // 3. The aggregator with its embedded broker, then the agents.
    let port = zk0_e2e::free_port()?;
    let agg_cfg = dir.join("aggregator.toml");
    let mut toml = format!(
        "federation = \"demo\"\n[rounds]\nrounds = {}\nmin_clients = 3\nround_timeout_s = 600\n\
         local_steps = {}\nbatch_size = {}\nlr = {}\nmu = {}\nchunk_size = 262144\n\
         base_model = {:?}\n[metrics]\nlisten = \"\"\n",
        args.rounds,
        args.steps,
        args.batch_size,
        args.lr,
        args.mu,
        model.display().to_string()
    );
    // The federation's datasets (for the records and the model card) and the server
    // evaluation: zk0-train eval on the held-out dataset, the same batches, noise and times
    // for every model.
    for (cid, ..) in CLIENTS {
        toml.push_str(&format!(
            "[[datasets.clients]]\nrepo_id = {:?}\nclient_id = {cid:?}\n",
            datasets[cid].display().to_string()
        ));
    }
    toml.push_str(&format!(
        "[[datasets.server]]\nrepo_id = {:?}\n[outputs.eval]\ndataset = {:?}\nworker = {:?}\n\
         worker_args = [\"--threads\", \"2\"]\nbatch_size = 8\nseed = 1234\n{}\
         [outputs.checkpoint]\nevery = {}\n",
        heldout.display().to_string(),
        heldout.display().to_string(),
        demo.bin("zk0-train").display().to_string(),
        match &tokenizer {
            Some(t) => format!("tokenizer = {:?}\n", t.display().to_string()),
            None => String::new(),
        },
        args.checkpoint_every,
    ));
    std::fs::write(&agg_cfg, toml)?;
    let mut cmd = Command::new(&agg);
    cmd.arg("--config")
        .arg(&agg_cfg)
        .arg("--state-dir")
        .arg(&state)
        .args(["serve", "--insecure", "--exit-when-done", "--listen"])
        .arg(format!("127.0.0.1:{port}"));
    let mut aggregator = Proc::spawn("zk0-aggregator", cmd, &dir.join("logs/aggregator.log"))?;
    zk0_e2e::wait_for(Duration::from_secs(20), "the embedded broker", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    demo.log(format!(
        "aggregator serving on mqtt://127.0.0.1:{port} (embedded broker, plain MQTT)"
    ));
    let mut agents = Vec::new();
    for (cid, _, _, codec) in CLIENTS {
        let adir = dir.join("agents").join(cid);
        let frames = read_json(&datasets[cid].join("meta/info.json"))
            .and_then(|v| v["total_frames"].as_u64())
            .unwrap_or(100);
        let mut toml = format!(
            "client_id = {cid:?}\nfederation = \"demo\"\nbroker = \"mqtt://127.0.0.1:{port}\"\n\
             insecure = true\nkey_file = {:?}\naggregator_key = {:?}\ndataset = {:?}\n\
             examples = {frames}\ncache_dir = {:?}\nwork_dir = {:?}\ncodec = {codec:?}\n\
             worker = [{:?}, \"train\"]\nworker_args = [\"--threads\", \"{}\"]\nmodel_dir = {:?}\n",
            adir.join("agent.key"),
            state.join("aggregator.pub"),
            datasets[cid],
            adir.join("cache"),
            adir.join("work"),
            demo.bin("zk0-train"),
            args.threads,
            model,
        );
        if let Some(t) = &tokenizer {
            toml.push_str(&format!("tokenizer = {t:?}\n"));
        }
        let cfg = adir.join("agent.toml");
        std::fs::write(&cfg, toml)?;
        let mut cmd = Command::new(&agent_bin);
        cmd.args(["run", "--config"])
            .arg(&cfg)
            .args(["--max-rounds", &args.rounds.to_string()]);
        agents.push(Proc::spawn(
            cid,
            cmd,
            &dir.join("logs").join(format!("{cid}.log")),
        )?);
        demo.log(format!(
            "agent {cid} started (codec {codec}, {frames} examples)"
        ));
    }

    // 4. Follow the rounds through the aggregator's state file and run outputs.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let (mut last_phase, mut last_round, mut last_accepted, mut reported) =
        (String::new(), 0u64, 0usize, 0usize);
    let mut initial_reported = false;
    loop {
        if !initial_reported {
            if let Some(p) = read_json(&state.join("policy_loss_history.json"))
                .and_then(|h| h["points"].get(0).cloned())
            {
                demo.log(format!(
                    "server evaluation of the initial model: policy loss {:.4}",
                    p["policy_loss"].as_f64().unwrap_or(f64::NAN)
                ));
                initial_reported = true;
            }
        }
        if let Some(st) = read_json(&state.join("state.json")) {
            let round = st["round"].as_u64().unwrap_or(0);
            let phase = st["phase"]["phase"].as_str().unwrap_or("").to_string();
            let accepted: Vec<&str> = st["accepted"]
                .as_object()
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            if round != last_round {
                last_round = round;
                last_accepted = 0;
            }
            if accepted.len() > last_accepted {
                demo.log(format!(
                    "round {round}: update accepted from {} ({}/3)",
                    accepted.join(", "),
                    accepted.len()
                ));
                last_accepted = accepted.len();
            }
            let key = format!("{round}/{phase}");
            if key != last_phase {
                match phase.as_str() {
                    "waiting" => demo.log(format!(
                        "round {round}: waiting for 3 agents to come online"
                    )),
                    "collecting" => demo.log(format!(
                        "round {round}/{}: announced; agents download the model and train",
                        args.rounds
                    )),
                    "aggregating" => demo.log(format!(
                        "round {round}: aggregating, then server evaluation on the held-out dataset"
                    )),
                    _ => {}
                }
                last_phase = key;
            }
            if let Some(h) = st["history"].as_array() {
                for s in &h[reported.min(h.len())..] {
                    let r = s["round"].as_u64().unwrap_or(0);
                    // Recorded before the round completes, so it is there with the history.
                    let policy = read_json(&state.join("policy_loss_history.json")).and_then(|v| {
                        v["points"]
                            .as_array()?
                            .iter()
                            .find(|p| p["round"].as_u64() == Some(r))?["policy_loss"]
                            .as_f64()
                    });
                    demo.log(format!(
                        "round {r} done in {:.1} s: accepted {}, mean train loss {:.4}, server policy loss {}, new model {}…",
                        s["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                        s["accepted"],
                        s["metrics"]["loss"].as_f64().unwrap_or(f64::NAN),
                        policy.map_or("-".to_string(), |l| format!("{l:.4}")),
                        s["model_id"].as_str().and_then(|m| m.get(..12)).unwrap_or("")
                    ));
                }
                reported = h.len();
            }
        }
        if let Some(st) = aggregator.child.try_wait()? {
            anyhow::ensure!(
                st.success(),
                "the aggregator exited with {st}; see {}",
                dir.join("logs/aggregator.log").display()
            );
            break;
        }
        for a in &mut agents {
            if let Some(st) = a.child.try_wait()? {
                anyhow::ensure!(
                    st.success(),
                    "agent {} exited with {st}; see its log in {}",
                    a.name,
                    dir.join("logs").display()
                );
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {} s; logs in {}",
            args.timeout_s,
            dir.join("logs").display()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for a in &mut agents {
        let t = Instant::now();
        while a.child.try_wait()?.is_none() && t.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(agents);
    let st = read_json(&state.join("state.json")).context("state.json")?;
    let history = st["history"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(
        history.len() as u64 == args.rounds,
        "{} rounds ran, {} expected",
        history.len(),
        args.rounds
    );
    demo.log(format!("federation finished: {} rounds", history.len()));

    // 5. The aggregator's outputs: every one must be there.
    let policy = read_json(&state.join("policy_loss_history.json"))
        .context("the aggregator wrote no policy_loss_history.json (server evaluation failed? see logs/aggregator.log)")?;
    let policy_loss: BTreeMap<u64, f64> = policy["points"]
        .as_array()
        .map(|pts| {
            pts.iter()
                .filter_map(|p| Some((p["round"].as_u64()?, p["policy_loss"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    let checkpoint = state
        .join("checkpoints")
        .join(format!("round_{:03}", args.rounds))
        .join("pretrained_model");
    let plots = state.join("plots");
    for f in [
        checkpoint.join("model.safetensors"),
        checkpoint.join("config.json"),
        checkpoint.join("README.md"),
        checkpoint.join("metrics.json"),
        plots.join("server_policy_loss.png"),
        plots.join("client_loss.svg"),
        state.join("federated_metrics.json"),
        state.join(format!("round_{:03}_server_eval.json", args.rounds)),
    ] {
        anyhow::ensure!(f.is_file(), "the aggregator did not write {}", f.display());
    }
    let final_loss = policy_loss
        .get(&args.rounds)
        .copied()
        .context("no server evaluation of the final model")?;

    // 6. The final checkpoint is a LeRobot model directory zk0-train loads as is: its
    // held-out loss (same seed and batches) must be the server's final policy loss.
    let check = dir.join("final_checkpoint_eval.json");
    let mut cmd = Command::new(demo.bin("zk0-train"));
    cmd.args(["--threads", "2", "eval", "--model"])
        .arg(&checkpoint)
        .arg("--dataset")
        .arg(&heldout)
        .args(["--batch-size", "8", "--seed", "1234", "--out"])
        .arg(&check);
    if let Some(t) = &tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    zk0_e2e::run_ok(&mut cmd)?;
    let reloaded = read_json(&check)
        .and_then(|v| v["loss"].as_f64())
        .unwrap_or(f64::NAN);
    // Equal up to the checkpoint's dtype (bf16 weights round the global f32 tensors).
    let same = (reloaded - final_loss).abs() <= 1e-3 * final_loss.abs().max(1.0);
    demo.log(format!(
        "final checkpoint reloaded by zk0-train eval: policy loss {reloaded:.6} (server: {final_loss:.6}) {}",
        if same { "- match" } else { "- MISMATCH" }
    ));
    anyhow::ensure!(
        same,
        "the checkpoint does not reproduce the server's final loss"
    );

    // 7. The robot's side: the final model exported to ONNX and run by zk0-agent on ONNX
    // Runtime (no libtorch) over a held-out episode, its chunks against the recorded actions.
    let export = dir.join("export");
    let mut cmd = Command::new(demo.bin("zk0-train"));
    cmd.args(["export-onnx", "--model"])
        .arg(&checkpoint)
        .arg("--out")
        .arg(&export);
    if let Some(t) = &tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    zk0_e2e::run_ok(&mut cmd)?;
    let predictions = dir.join("heldout_predictions.safetensors");
    let report = zk0_e2e::run_ok(
        Command::new(demo.bin("zk0-agent"))
            .args(["infer", "--threads", "2", "--episode", "0", "--model"])
            .arg(&export)
            .arg("--dataset")
            .arg(&heldout)
            .arg("--out")
            .arg(&predictions),
    )?;
    let r: Value = serde_json::from_str(report.trim()).context("zk0-agent infer report")?;
    demo.log(format!(
        "final model exported to ONNX and run by zk0-agent infer on held-out episode 0: {} \
         chunks, action MAE {:.3} (RMSE {:.3}), {:.1} ms per chunk",
        r["predictions"],
        r["mae"].as_f64().unwrap_or(f64::NAN),
        r["rmse"].as_f64().unwrap_or(f64::NAN),
        r["chunk_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
    ));

    // 8. Where everything is, and the per-round table.
    let elapsed = demo.t0.elapsed().as_secs_f64();
    println!();
    println!("zk0 demo finished in {elapsed:.0} s");
    println!("  run dir                {}", dir.display());
    println!("  aggregator state       {}", state.display());
    println!(
        "  round records          {}",
        state.join("round_NNN_server_eval.json").display()
    );
    println!(
        "  policy loss history    {}",
        state.join("policy_loss_history.json").display()
    );
    println!(
        "  federated metrics      {}",
        state.join("federated_metrics.json").display()
    );
    println!(
        "  plots (PNG + SVG)      {}",
        plots
            .join("{server_policy_loss,client_loss,update_norms,bytes_per_round}.png")
            .display()
    );
    println!(
        "  checkpoints            {}",
        state
            .join("checkpoints/round_NNN/pretrained_model")
            .display()
    );
    println!("  final model (LeRobot)  {}", checkpoint.display());
    println!(
        "  model card             {}",
        checkpoint.join("README.md").display()
    );
    println!("  ONNX export            {}", export.display());
    println!("  robot predictions      {}", predictions.display());
    println!(
        "  global models          {}",
        state.join("models/<model id>.safetensors").display()
    );
    println!(
        "  datasets               {}",
        dir.join("datasets").display()
    );
    println!("  logs                   {}", dir.join("logs").display());
    println!();
    let names: Vec<&str> = CLIENTS.iter().map(|c| c.0).collect();
    print!("round  clients  mean-train-loss");
    for n in &names {
        print!("  {n:>9}");
    }
    println!("  update-norm  server-policy-loss  seconds");
    println!(
        "{:>5}  {:>7}  {:>15}{}  {:>11}  {:>18}  {:>7}",
        0,
        "-",
        "-",
        names
            .iter()
            .map(|_| format!("  {:>9}", "-"))
            .collect::<String>(),
        "-",
        policy_loss
            .get(&0)
            .map_or("-".to_string(), |l| format!("{l:.4}")),
        "-"
    );
    for h in &history {
        let r = h["round"].as_u64().unwrap_or(0);
        let rec = read_json(&state.join(format!("round_{r:03}_server_eval.json")));
        let per: String = names
            .iter()
            .map(|n| {
                let l = rec.as_ref().and_then(|v| {
                    v["clients"]
                        .as_array()?
                        .iter()
                        .find(|c| c["client_id"] == *n)?["loss"]
                        .as_f64()
                });
                match l {
                    Some(l) => format!("  {l:>9.4}"),
                    None => format!("  {:>9}", "-"),
                }
            })
            .collect();
        println!(
            "{:>5}  {:>7}  {:>15.4}{per}  {:>11.4}  {:>18}  {:>7.1}",
            r,
            h["accepted"].as_array().map_or(0, Vec::len),
            h["metrics"]["loss"].as_f64().unwrap_or(f64::NAN),
            h["metrics"]["update_norm"].as_f64().unwrap_or(f64::NAN),
            policy_loss
                .get(&r)
                .map_or("-".to_string(), |l| format!("{l:.4}")),
            h["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
    }
    println!();
    println!("(train losses: each client's mean flow-matching loss over its local steps, the mean");
    println!(" weighted by examples; server policy loss: the aggregator's zk0-train eval of the");
    println!(" global model after that round on the held-out dataset, round 0 = initial model)");
    Ok(())
}

/// A checkpoint directory, or a Hub id (`owner/name`) looked up in the local Hugging Face
/// cache: the demo never downloads (the snapshot directory holds the checkpoint's files).
fn resolve_model(m: &str) -> Result<PathBuf> {
    zk0_host::hf_cache::cached_checkpoint(m).context("--model")
}
