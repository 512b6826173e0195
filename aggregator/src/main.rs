//! `zk0-aggregator`: the cloud daemon of a zk0 federation.
//!
//! It runs (or connects to) the MQTT broker, drives FedProx rounds through a persisted state
//! machine, verifies and aggregates the robots' signed deltas, publishes each new global model
//! signed and chunked, and exports Prometheus metrics. Subcommands:
//!
//! - `init --model <file.safetensors>`: create the state dir, signing key and round-1 model.
//! - `serve`: run the daemon (embedded broker unless `--broker mqtt://host:port`).
//! - `keys enroll|list|revoke`: manage the client keys whose updates are accepted.
//! - `status`: print the persisted round state.
//! - `certs init --dir <d>`: a private CA and broker certificate for mqtts.

mod aggregate;
mod broker;
mod config;
mod doctor;
mod metrics;
mod round;
mod server;
mod store;
mod tls;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shared_proto::sign::{KeyPair, PublicKey};

use crate::config::Config;
use crate::store::{EnrolledKey, Store};

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
        /// Trainable tensors of the initial global model (f32 safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Replace an existing state (loses its rounds).
        #[arg(long)]
        force: bool,
    },
    /// Run the aggregator daemon.
    Serve(ServeArgs),
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
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write ca.pem, ca.key, server.pem, server.key into `--dir` (never overwrites). Point
    /// `broker.tls_cert`/`tls_key` at the server pair and give agents ca.pem.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// DNS names / IP addresses the broker is reached by (default: localhost, 127.0.0.1).
        #[arg(long = "san")]
        sans: Vec<String>,
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

fn main() -> Result<()> {
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
        Command::Init { model, force } => init(&store, &model, force),
        Command::Serve(a) => {
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
            cfg.validate()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(server::run(cfg, store, a.exit_when_done))
        }
        Command::Keys { cmd } => keys(&store, cmd),
        Command::Status { json } => status(&store, json),
        Command::Doctor { json, strict } => {
            let healthy = doctor::run(&cfg, cli.config.as_deref(), json)?;
            if strict && !healthy {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Certs {
            cmd: CertsCmd::Init { dir, sans },
        } => {
            tls::certs_init(&dir, &sans)?;
            println!("wrote {}/{{ca,server}}.{{pem,key}}", dir.display());
            Ok(())
        }
    }
}

fn init(store: &Store, model: &std::path::Path, force: bool) -> Result<()> {
    if store.state_path().exists() && !force {
        anyhow::bail!(
            "{} already holds a federation (use --force to start over)",
            store.dir.display()
        );
    }
    std::fs::create_dir_all(&store.dir)
        .with_context(|| format!("creating {}", store.dir.display()))?;
    if !store.key_path().exists() {
        let kp = KeyPair::generate();
        shared_proto::sign::save_keypair(store.key_path(), &kp)?;
        store::write_atomic(&store.pub_path(), kp.public().to_pem().as_bytes())?;
    }
    let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let (tensors, _) = shared_proto::tensor::read_safetensors(&bytes)
        .with_context(|| format!("{} is not a readable f32 safetensors file", model.display()))?;
    shared_proto::tensor::ModelSpec::from_tensors(&tensors)
        .validate(&tensors)
        .with_context(|| format!("{} is not a valid model", model.display()))?;
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

fn keys(store: &Store, cmd: KeysCmd) -> Result<()> {
    let mut reg = store.load_keys()?;
    match cmd {
        KeysCmd::Enroll { pubkey, client_id } => {
            anyhow::ensure!(
                store::valid_client_id(&client_id),
                "invalid client id {client_id:?}"
            );
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
                    enrolled_unix_ms: server::now_ms(),
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

fn status(store: &Store, json: bool) -> Result<()> {
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
    Ok(())
}
