//! Command-line pieces of `zk0-agent` that are not a subcommand module of their own: the
//! `run` / `start` arguments (overrides of the TOML config) and `keys` (the agent's ed25519
//! key pair).

use std::path::{Path, PathBuf};

use anyhow::Result;
use shared_proto::sign::KeyPair;

use crate::federate::config::{self, AgentConfig};

/// `zk0-agent run` arguments.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Agent config file (TOML).
    #[arg(long, short, env = "ZK0_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override `client_id`.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Override `broker` (mqtt://host:port).
    #[arg(long)]
    pub broker: Option<String>,
    /// Override `federation`.
    #[arg(long)]
    pub federation: Option<String>,
    /// Override `dataset`: a LeRobot dataset directory, or a Hub repo id (`owner/name`)
    /// already in the local LeRobot cache (`$HF_LEROBOT_HOME`, `$HF_HOME/lerobot`,
    /// `~/.cache/huggingface/lerobot`).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Override `work_dir` (also where `start` puts the pidfile, log and status file).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Override `codec` (f32, bf16, int8, topk:<fraction>).
    #[arg(long)]
    pub codec: Option<String>,
    /// Connect without broker credentials (local demos and tests only).
    #[arg(long)]
    pub insecure: bool,
    /// Exit after taking part in this many rounds (0: run forever).
    #[arg(long, default_value_t = 0)]
    pub max_rounds: u64,
}

impl RunArgs {
    /// The config file with these overrides applied, the dataset resolved, validated.
    pub fn config(&self) -> Result<AgentConfig> {
        let mut cfg = AgentConfig::load(self.config.as_deref())?;
        let set = |slot: &mut String, v: &Option<String>| {
            if let Some(v) = v {
                slot.clone_from(v);
            }
        };
        set(&mut cfg.client_id, &self.client_id);
        set(&mut cfg.broker, &self.broker);
        set(&mut cfg.federation, &self.federation);
        set(&mut cfg.codec, &self.codec);
        if let Some(v) = &self.dataset {
            cfg.dataset.clone_from(v);
        }
        if let Some(v) = &self.work_dir {
            cfg.work_dir.clone_from(v);
        }
        cfg.dataset = config::resolve_dataset(&cfg.dataset);
        cfg.insecure |= self.insecure;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `zk0-agent keys` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum KeysCmd {
    /// Create this agent's ed25519 key pair (`<key>` and `<key>.pub`), refusing to overwrite.
    Init {
        /// Private key file.
        #[arg(long, default_value = "agent.key")]
        key: PathBuf,
    },
    /// Print the public key (PEM) and its fingerprint, for `zk0-aggregator keys enroll`.
    Show {
        #[arg(long, default_value = "agent.key")]
        key: PathBuf,
    },
}

/// Runs a `keys` subcommand.
pub fn keys(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Init { key } => {
            anyhow::ensure!(
                !key.exists(),
                "{} exists; refusing to overwrite a key",
                key.display()
            );
            if let Some(d) = key.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(d)?;
            }
            let kp = KeyPair::generate();
            zk0_daemon::keys::save_keypair(&key, &kp)?;
            let pub_path = pub_path(&key);
            zk0_daemon::keys::save_public_key(&pub_path, &kp.public())?;
            println!(
                "wrote {} and {} ({})",
                key.display(),
                pub_path.display(),
                kp.public().fingerprint()
            );
        }
        KeysCmd::Show { key } => {
            let kp = zk0_daemon::keys::load_keypair(&key)?;
            print!("{}", kp.public().to_pem());
            eprintln!("fingerprint {}", kp.public().fingerprint());
        }
    }
    Ok(())
}

fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}
