//! `zk0-aggregator`: the cloud daemon of a zk0 federation.
//!
//! It runs (or connects to) the MQTT broker, drives FedProx rounds through a persisted state
//! machine, verifies and aggregates the robots' signed deltas, publishes each new global model
//! signed and chunked, and exports Prometheus metrics. Subcommands:
//!
//! - `init --model <file.safetensors>`: create the state dir, signing key and round-1 model.
//! - `serve`: run the daemon (embedded broker unless `--broker mqtt://host:port`).
//! - `keys enroll|list|revoke`: manage the client keys whose updates are accepted.
//! - `status`: the round, the daemon (running or not), the next round's scheduled LR/mu and
//!   every client with its last loss and dataset.
//! - `start` / `stop`: `serve` as a background daemon with a pidfile and log in the state dir.
//! - `push --repo <owner/name> --dir <folder>`: upload a folder to the Hugging Face Hub.
//! - `certs init --dir <d>`: a private CA and broker certificate for mqtts; `certs issue <id>`:
//!   a client certificate from that CA (mutual TLS).
//! - `acl --mosquitto <d>`: mosquitto password file, ACL and conf snippet for the federation.
//!
//! The daemon itself is the `aggregator` library (module map in its crate doc, `lib.rs`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shared_proto::sign::{KeyPair, PublicKey};
use zk0_daemon::{write_atomic, Durability::Durable};

use aggregator::config::Config;
use aggregator::store::{EnrolledKey, Store};
use aggregator::{aggregate, checkpoint, doctor, hub, outputs, round, server, tls};

#[derive(Parser)]
#[command(
    name = "zk0-aggregator",
    version,
    about = "zk0 federated-learning aggregator"
)]
struct Cli {
    /// TOML config file (see the `config` module docs for every key).
    #[arg(long, short, global = true, env = "ZK0_AGGREGATOR_CONFIG")]
    config: Option<PathBuf>,
    /// State directory (overrides `state_dir`).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the state directory, the aggregator's signing key and the initial global model.
    Init {
        /// Trainable tensors of the initial global model (f32 safetensors). With `--init`:
        /// which tensors are trainable (their values come from the checkpoint).
        #[arg(long, required_unless_present_any = ["init", "resume"])]
        model: Option<PathBuf>,
        /// Warm start from a LeRobot SmolVLA checkpoint: a directory, or a Hub id already in
        /// the local Hugging Face cache. Its trainable tensors become the round-1 model.
        #[arg(long, conflicts_with = "resume")]
        init: Option<String>,
        /// Continue a run from a zk0 checkpoint (`checkpoints/round_NNN`): its round, global
        /// model, history and schedule state; `serve --rounds N` then runs up to round N.
        #[arg(long, conflicts_with = "model")]
        resume: Option<PathBuf>,
        /// Replace an existing state (loses its rounds).
        #[arg(long)]
        force: bool,
    },
    /// Run the aggregator daemon.
    Serve(ServeArgs),
    /// Start `serve` in the background (same options as `serve`): pidfile and log file in the
    /// state dir; refused while it already runs.
    Start(ServeArgs),
    /// Push a folder (e.g. `checkpoints/round_NNN/pretrained_model`) to a Hugging Face Hub
    /// model repo, creating it if missing. Token: HF_TOKEN or the HF token file; endpoint:
    /// HF_ENDPOINT.
    Push {
        /// Model repo id (`owner/name`).
        #[arg(long)]
        repo: String,
        /// Folder to upload.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop the background daemon (SIGTERM, then wait for it to exit).
    Stop {
        /// Seconds to wait for the exit.
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
    /// Manage enrolled client keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Make a private CA and a broker certificate for mqtts (`certs init`).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Write a mosquitto password file (`passwd`), ACL (`acl`) and conf snippet (`zk0.conf`)
    /// from `[broker.users]` and `broker.username`: each client login publishes only under its
    /// own `client/<id>/` topics, and is bound to one MQTT client id.
    Acl {
        /// Directory to write into (files are replaced).
        #[arg(long)]
        mosquitto: PathBuf,
    },
    /// Check this host: CPU, memory, disk, state dir, config, broker and metrics ports.
    Doctor {
        /// Print one JSON object instead of a checklist.
        #[arg(long)]
        json: bool,
        /// Exit with status 1 when any check fails.
        #[arg(long)]
        strict: bool,
    },
    /// Show the round, its clients and the last round's metrics.
    Status {
        /// Print the raw state as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Use an external broker (`mqtt://host:port`) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// Embedded broker listen address (overrides `broker.listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Prometheus listen address (overrides `metrics.listen`; empty disables).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Federation name (topic prefix `zk0/v1/<federation>/`).
    #[arg(long)]
    federation: Option<String>,
    /// Override `rounds.rounds`.
    #[arg(long)]
    rounds: Option<u64>,
    /// Override `rounds.min_clients`.
    #[arg(long)]
    min_clients: Option<usize>,
    /// Override `rounds.round_timeout_s`.
    #[arg(long)]
    round_timeout_s: Option<f64>,
    /// Override `rounds.chunk_size`.
    #[arg(long)]
    chunk_size: Option<usize>,
    /// Plain MQTT without credentials. For local demos and tests only.
    #[arg(long)]
    insecure: bool,
    /// Exit once every configured round is published.
    #[arg(long)]
    exit_when_done: bool,
    /// Push the final checkpoint's `pretrained_model/` to this Hub model repo (`owner/name`;
    /// needs a token, see `push`). Overrides `outputs.push_to_hub`.
    #[arg(long)]
    push_to_hub: Option<String>,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write ca.pem, ca.key, server.pem, server.key into `--dir` (never overwrites). Point
    /// `broker.tls_cert`/`tls_key` at the server pair and give agents ca.pem.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// DNS names / IP addresses the agents reach the broker by. `localhost` and
        /// `127.0.0.1` are always included: the aggregator dials its own broker by them.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Write `<client-id>.pem`/`.key` into `--dir`: a client certificate signed by its CA
    /// (`certs init`), for a broker that requires mutual TLS.
    Issue {
        client_id: String,
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Enroll a client's public key (PEM, as written by `zk0-agent keys init`).
    Enroll {
        /// Public key file.
        pubkey: PathBuf,
        /// Client id the key belongs to.
        #[arg(long)]
        client_id: String,
    },
    /// List enrolled clients and their key fingerprints.
    List,
    /// Revoke a client's key: its updates are rejected from now on.
    Revoke { client_id: String },
    /// Print the aggregator's public key (PEM), for agents to pin.
    Show,
}

/// Allocations of 1 MiB and more (model tensors, update blobs) get mappings of their own that
/// go back to the system when freed. glibc's default threshold rises after the first large
/// free, and the freed tensors of an aggregation would then stay resident in its heaps while
/// the next round's work (publishing, the next uploads) adds its own on top.
fn return_large_frees() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a glibc allocator parameter; called first thing in `main`,
    // before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> Result<()> {
    return_large_frees();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(d) = cli.state_dir {
        cfg.state_dir = d;
    }
    let store = Store::new(cfg.state_dir.clone());
    match cli.command {
        Command::Init {
            model,
            init: from,
            resume,
            force,
        } => match resume {
            Some(ckpt) => init_resume(&store, &ckpt, force),
            None => init(&store, model.as_deref(), from.as_deref(), force),
        },
        Command::Serve(a) => serve(cfg, store, a),
        Command::Start(_) => start(&store),
        Command::Push { repo, dir } => push(&repo, &dir),
        Command::Stop { timeout_s } => {
            match daemon(&store).stop(std::time::Duration::from_secs(timeout_s))? {
                Some(pid) => println!("zk0-aggregator stopped (pid {pid})"),
                None => println!("zk0-aggregator is not running"),
            }
            Ok(())
        }
        Command::Keys { cmd } => keys(&store, cmd),
        Command::Status { json } => status(&store, &cfg, json),
        Command::Doctor { json, strict } => {
            let healthy = doctor::run(&cfg, cli.config.as_deref(), json)?;
            if strict && !healthy {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Acl { mosquitto } => {
            aggregator::acl::write_mosquitto(&cfg, &mosquitto)?;
            println!(
                "wrote {0}/passwd, {0}/acl and {0}/zk0.conf (paste it after mosquitto.conf's listener line)",
                mosquitto.display()
            );
            Ok(())
        }
        Command::Certs {
            cmd: CertsCmd::Init { dir, sans },
        } => {
            tls::certs_init(&dir, &sans)?;
            println!("wrote {}/{{ca,server}}.{{pem,key}}", dir.display());
            Ok(())
        }
        Command::Certs {
            cmd: CertsCmd::Issue { client_id, dir },
        } => {
            tls::certs_issue(&dir, &client_id)?;
            println!("wrote {}/{client_id}.{{pem,key}}", dir.display());
            Ok(())
        }
    }
}

/// `serve`: the command line's overrides on the config, then the daemon until it stops.
fn serve(mut cfg: Config, store: Store, a: ServeArgs) -> Result<()> {
    if let Some(b) = a.broker {
        cfg.broker.url = b;
    }
    if let Some(l) = a.listen {
        cfg.broker.listen = l;
    }
    if let Some(m) = a.metrics_listen {
        cfg.metrics.listen = m;
    }
    if let Some(f) = a.federation {
        cfg.federation = f;
    }
    if let Some(r) = a.rounds {
        cfg.rounds.rounds = r;
    }
    if let Some(m) = a.min_clients {
        cfg.rounds.min_clients = m;
    }
    if let Some(t) = a.round_timeout_s {
        cfg.rounds.round_timeout_s = t;
    }
    if let Some(c) = a.chunk_size {
        cfg.rounds.chunk_size = c;
        cfg.broker.max_packet_bytes = cfg.broker.max_packet_bytes.max(c + (64 << 10));
    }
    cfg.insecure |= a.insecure;
    if let Some(r) = a.push_to_hub {
        cfg.outputs.push_to_hub = r;
    }
    cfg.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(server::run(cfg, store, a.exit_when_done))
}

/// `start`: `serve` in the background, with this very command line.
fn start(store: &Store) -> Result<()> {
    // The daemon gets this very command line with `serve` for `start`, so every
    // global and serve option means the same in both.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(a) = args.iter_mut().find(|a| *a == "start") {
        *a = "serve".into();
    }
    anyhow::ensure!(
        store.state_path().exists(),
        "no federation in {} (run `init` first)",
        store.dir.display()
    );
    let d = daemon(store);
    let exe = std::env::current_exe().context("locating zk0-aggregator")?;
    let pid = d.start(&exe, &args)?;
    println!(
        "zk0-aggregator started (pid {pid}); log {}",
        d.logfile().display()
    );
    Ok(())
}

/// `push`: a checkpoint folder to a Hub model repo.
fn push(repo: &str, dir: &std::path::Path) -> Result<()> {
    let token = hub::token_from_env()
        .context("no Hugging Face token: set HF_TOKEN or log in (the HF token file)")?;
    let r = hub::push_folder(&hub::endpoint_from_env(), &token, repo, dir)?;
    println!(
        "pushed {} regular and {} LFS files ({} already on the Hub) to {}",
        r.regular.len(),
        r.lfs.len() + r.lfs_skipped.len(),
        r.lfs_skipped.len(),
        r.repo_url
    );
    if !r.commit_url.is_empty() {
        println!("commit {}", r.commit_url);
    }
    Ok(())
}

/// The background daemon's pid and log files live in the state dir.
fn daemon(store: &Store) -> zk0_host::daemon::Daemon {
    zk0_host::daemon::Daemon {
        name: "zk0-aggregator",
        dir: store.dir.clone(),
    }
}

/// Creates the state dir and the aggregator's key pair; refuses to replace a federation
/// unless `force`.
fn prepare_state_dir(store: &Store, force: bool) -> Result<()> {
    if store.state_path().exists() && !force {
        anyhow::bail!(
            "{} already holds a federation (use --force to start over)",
            store.dir.display()
        );
    }
    std::fs::create_dir_all(&store.dir)
        .with_context(|| format!("creating {}", store.dir.display()))?;
    // A replaced federation's run outputs would mix with the new run's; checkpoints stay (one
    // may be what `--resume` reads).
    for e in std::fs::read_dir(&store.dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let p = e.path();
        if (name.starts_with("round_") && name.ends_with("_server_eval.json"))
            || name == "policy_loss_history.json"
            || name == "federated_metrics.json"
        {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        } else if name == "rounds" || name == "plots" {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    if !store.key_path().exists() {
        let kp = KeyPair::generate();
        zk0_daemon::keys::save_keypair(store.key_path(), &kp)?;
        zk0_daemon::keys::save_public_key(store.pub_path(), &kp.public())?;
    }
    Ok(())
}

fn init(
    store: &Store,
    model: Option<&std::path::Path>,
    from: Option<&str>,
    force: bool,
) -> Result<()> {
    let like = match model {
        Some(model) => {
            let bytes =
                std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
            let (tensors, _) =
                shared_proto::tensor::read_safetensors(&bytes).with_context(|| {
                    format!("{} is not a readable f32 safetensors file", model.display())
                })?;
            shared_proto::tensor::ModelSpec::from_tensors(&tensors)
                .validate(&tensors)
                .with_context(|| format!("{} is not a valid model", model.display()))?;
            Some(tensors)
        }
        None => None,
    };
    let tensors = match (from, like) {
        (Some(from), like) => {
            let dir = checkpoint::resolve(from)?;
            let spec = like
                .as_ref()
                .map(shared_proto::tensor::ModelSpec::from_tensors);
            let t = checkpoint::trainable_from(&dir, spec.as_ref())?;
            println!(
                "warm start from {} ({} trainable tensors)",
                dir.display(),
                t.len()
            );
            t
        }
        (None, Some(t)) => t,
        (None, None) => anyhow::bail!("give --model, --init or --resume"),
    };
    prepare_state_dir(store, force)?;
    let model_id = aggregate::save_model(store, &tensors)?;
    let state = round::RoundState::new(model_id.clone());
    store.save_state(&state)?;
    println!(
        "initialised {} with model {model_id} ({} tensors)",
        store.dir.display(),
        tensors.len()
    );
    println!("aggregator public key: {}", store.pub_path().display());
    Ok(())
}

/// `init --resume`: the state of a checkpoint's run, ready to serve its next round, with the
/// run outputs (metrics, histories, round records) restored.
fn init_resume(store: &Store, ckpt: &std::path::Path, force: bool) -> Result<()> {
    let (t, global) = checkpoint::load_resume(ckpt)?;
    prepare_state_dir(store, force)?;
    let model_id = aggregate::save_model(store, &global)?;
    anyhow::ensure!(model_id == t.model_id, "checkpoint model id mismatch");
    let mut state = t.state.clone();
    state.round = t.round + 1;
    state.model_id = model_id.clone().into();
    state.phase = round::Phase::Waiting;
    state.selected.clear();
    state.accepted.clear();
    store.save_state(&state)?;
    let outputs = outputs::Outputs::new(store);
    for s in &state.history {
        write_atomic(
            &store.round_summary_path(s.round),
            &serde_json::to_vec_pretty(s)?,
            Durable,
        )?;
    }
    write_atomic(
        &store.dir.join("federated_metrics.json"),
        &serde_json::to_vec_pretty(&state.history)?,
        Durable,
    )?;
    outputs.save_history(&t.policy_loss)?;
    for r in &t.rounds {
        outputs.save_round(r)?;
    }
    println!(
        "resumed {} from {} at round {} (model {model_id})",
        store.dir.display(),
        ckpt.display(),
        state.round
    );
    Ok(())
}

fn keys(store: &Store, cmd: KeysCmd) -> Result<()> {
    let mut reg = store.load_keys()?;
    match cmd {
        KeysCmd::Enroll { pubkey, client_id } => {
            shared_proto::topic::validate_client_id(&client_id)?;
            let pem = std::fs::read_to_string(&pubkey)
                .with_context(|| format!("reading {}", pubkey.display()))?;
            let key = PublicKey::from_pem(&pem)
                .with_context(|| format!("{} is not an ed25519 public key", pubkey.display()))?;
            let fp = key.fingerprint();
            reg.clients.insert(
                client_id.clone(),
                EnrolledKey {
                    public_key_pem: key.to_pem(),
                    fingerprint: fp.clone(),
                    enrolled_unix_ms: zk0_daemon::now_ms(),
                },
            );
            store.save_keys(&reg)?;
            println!("enrolled {client_id} ({fp})");
        }
        KeysCmd::List => {
            for (cid, k) in &reg.clients {
                println!("{cid}\t{}", k.fingerprint);
            }
        }
        KeysCmd::Revoke { client_id } => {
            anyhow::ensure!(
                reg.clients.remove(&client_id).is_some(),
                "{client_id} is not enrolled"
            );
            store.save_keys(&reg)?;
            println!("revoked {client_id}");
        }
        KeysCmd::Show => {
            let pem = std::fs::read_to_string(store.pub_path()).with_context(|| {
                format!("reading {} (run `init` first)", store.pub_path().display())
            })?;
            print!("{pem}");
        }
    }
    Ok(())
}

fn status(store: &Store, cfg: &Config, json: bool) -> Result<()> {
    let Some(state) = store.load_state()? else {
        anyhow::bail!("no federation in {} (run `init`)", store.dir.display());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    let phase = serde_json::to_value(&state.phase)?;
    println!("round:     {}", state.round);
    println!("phase:     {}", phase["phase"].as_str().unwrap_or("?"));
    println!("model:     {}", state.model_id);
    println!(
        "selected:  {}",
        state
            .selected
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "accepted:  {}",
        state
            .accepted
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "enrolled:  {}",
        store
            .load_keys()?
            .clients
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(last) = state.history.last() {
        println!(
            "last round {}: {:?}, accepted [{}], dropped [{}], {:.1}s",
            last.round,
            last.close_reason,
            last.accepted.join(", "),
            last.dropped.join(", "),
            last.duration_ms as f64 / 1000.0
        );
        for (k, v) in &last.metrics {
            println!("  {k}: {v:.6}");
        }
    }
    client_status(store, cfg, &state)
}

/// The daemon, the next round's schedule and one line per known client: its last loss,
/// its next LR and its dataset.
fn client_status(store: &Store, cfg: &Config, state: &round::RoundState) -> Result<()> {
    match daemon(store).running()? {
        Some(pid) => println!("daemon:    running (pid {pid})"),
        None => println!("daemon:    not running"),
    }
    let r = &cfg.rounds;
    let base = shared_proto::message::HyperParams {
        local_steps: r.local_steps,
        lr: r.lr,
        mu: r.mu,
        batch_size: r.batch_size,
        lr_overrides: Default::default(),
    };
    let next = state.schedule.hyper(&cfg.schedule, &base, state.round);
    println!(
        "schedule:  round {} lr {:.3e} mu {:.4}{}",
        state.round,
        next.lr,
        next.mu,
        if state.schedule.spike {
            " (spike: adjustments held)"
        } else {
            ""
        }
    );
    let mut clients: std::collections::BTreeSet<String> =
        store.load_keys()?.clients.keys().cloned().collect();
    clients.extend(state.schedule.last_client_losses.keys().cloned());
    clients.extend(state.selected.iter().cloned());
    if clients.is_empty() {
        return Ok(());
    }
    println!("clients:");
    for c in clients {
        let loss = state
            .schedule
            .last_client_losses
            .get(&c)
            .map_or("-".to_string(), |l| format!("{l:.6}"));
        let dataset = cfg
            .datasets
            .for_client(&c)
            .map_or("-", |d| d.repo_id.as_str());
        println!(
            "  {c:<24} last loss {loss:<12} next lr {:.3e}  dataset {dataset}",
            next.lr_for(&c)
        );
    }
    Ok(())
}
