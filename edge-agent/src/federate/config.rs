//! Agent configuration (TOML), every field defaulted; CLI flags override it.
//!
//! ```toml
//! client_id = "robot-1"
//! federation = "demo"
//! broker = "mqtt://aggregator.example:1883"
//! username = ""                          # broker credentials, if the broker wants them
//! password = ""
//! insecure = false                       # allow connecting without credentials
//! ca_file = "/etc/zk0/ca.pem"            # CA for mqtts:// brokers (zk0-aggregator certs init)
//! key_file = "/var/lib/zk0-agent/agent.key"        # from `zk0-agent keys init`
//! aggregator_key = "/etc/zk0/aggregator.pub"       # pinned aggregator public key
//! dataset = "/var/lib/zk0-agent/dataset"
//! examples = 0                           # aggregation weight; 0 = from the worker's metrics
//! cache_dir = "/var/cache/zk0-agent"     # global models, by id
//! work_dir = "/var/lib/zk0-agent/work"
//! codec = "int8"                         # must be among the round's accepted codecs
//! zstd_level = 3
//! worker = ["zk0-train", "train"]        # the training worker command
//! worker_args = ["--threads", "2"]       # extra worker arguments, after the command
//! worker_output = "delta"                # "delta": the worker writes trained − global (zk0-train
//!                                        # --out-delta); "params": trained tensors, and the agent
//!                                        # subtracts the global model
//! model_dir = "/var/lib/zk0-agent/smolvla_base"   # base LeRobot checkpoint (--model)
//! tokenizer = ""                         # tokenizer.json (--tokenizer; default: the model's)
//! max_packet_bytes = 4194304
//! fetch_window = 8                       # model chunks requested at once
//! upload_max_bytes_per_sec = 0           # pace update uploads (thin uplinks); 0 = no limit
//! worker_timeout_secs = 0                # kill a training run after this long; 0 = at the
//!                                        # round's deadline (always the upper bound)
//! [robot]                                # record / teleop / calibrate / act: see `record::config`
//! [infer]                                # act's policy: see `act_cli::InferConfig`
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::worker::WorkerOutput;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub client_id: String,
    pub federation: String,
    pub broker: String,
    pub username: String,
    pub password: String,
    pub insecure: bool,
    /// CA certificate (PEM) trusted for `mqtts://` brokers.
    pub ca_file: PathBuf,
    /// Client certificate (PEM) presented to an mqtts broker that requires mutual TLS.
    pub cert_file: PathBuf,
    /// The private key of `cert_file` (PEM).
    pub cert_key_file: PathBuf,
    pub key_file: PathBuf,
    pub aggregator_key: PathBuf,
    pub dataset: PathBuf,
    pub examples: u64,
    pub cache_dir: PathBuf,
    pub work_dir: PathBuf,
    pub codec: String,
    pub zstd_level: i32,
    pub worker: Vec<String>,
    /// Extra arguments passed to the worker after `worker`.
    pub worker_args: Vec<String>,
    /// What the worker writes: trained tensors (`params`, zk0-train) or a `delta`.
    pub worker_output: WorkerOutput,
    /// Base LeRobot checkpoint directory given to the worker as `--model` (empty: none).
    pub model_dir: PathBuf,
    /// Tokenizer file given to the worker as `--tokenizer` (empty: none).
    pub tokenizer: PathBuf,
    pub max_packet_bytes: usize,
    pub fetch_window: u32,
    /// Average rate cap of an update's upload, in payload bytes per second (0: no limit), so
    /// a robot on a thin uplink does not saturate it for the whole upload (see
    /// [`super::upload`]). Slower than the round deadline allows, the update arrives too late.
    pub upload_max_bytes_per_sec: u64,
    /// A training run still going after this long is killed and reported as failed (0: only
    /// the round's deadline bounds it, since an update after the deadline is refused anyway).
    pub worker_timeout_secs: u64,
    /// Arms and cameras for `record`, `teleop`, `calibrate`.
    pub robot: crate::record::config::RobotConfig,
    /// The policy for `act`.
    pub infer: crate::act_cli::InferConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            client_id: String::new(),
            federation: "default".into(),
            broker: "mqtt://127.0.0.1:1883".into(),
            username: String::new(),
            password: String::new(),
            insecure: false,
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            cert_key_file: PathBuf::new(),
            key_file: PathBuf::from("agent.key"),
            aggregator_key: PathBuf::from("aggregator.pub"),
            dataset: PathBuf::from("dataset"),
            examples: 0,
            cache_dir: PathBuf::from("zk0-agent-cache"),
            work_dir: PathBuf::from("zk0-agent-work"),
            codec: "int8".into(),
            zstd_level: 3,
            worker: vec!["zk0-train".into(), "train".into()],
            worker_args: Vec::new(),
            worker_output: WorkerOutput::Delta,
            model_dir: PathBuf::new(),
            tokenizer: PathBuf::new(),
            max_packet_bytes: 4 << 20,
            fetch_window: 8,
            upload_max_bytes_per_sec: 0,
            worker_timeout_secs: 0,
            robot: Default::default(),
            infer: Default::default(),
        }
    }
}

impl AgentConfig {
    pub fn load(path: Option<&Path>) -> Result<AgentConfig> {
        let Some(path) = path else {
            return Ok(AgentConfig::default());
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        // The one client-id rule (the topic layer's), shared with the aggregator.
        shared_proto::topic::validate_client_id(&self.client_id)
            .map_err(|e| anyhow::anyhow!("client_id: {e}"))?;
        anyhow::ensure!(!self.worker.is_empty(), "worker command is empty");
        anyhow::ensure!(
            !self.broker.starts_with("mqtts://") || !self.ca_file.as_os_str().is_empty(),
            "an mqtts:// broker needs ca_file"
        );
        anyhow::ensure!(
            self.cert_file.as_os_str().is_empty() == self.cert_key_file.as_os_str().is_empty(),
            "cert_file and cert_key_file go together"
        );
        anyhow::ensure!(self.fetch_window > 0, "fetch_window must be positive");
        self.codec
            .parse::<shared_proto::codec::Codec>()
            .map_err(|e| anyhow::anyhow!("codec {:?}: {e}", self.codec))?;
        anyhow::ensure!(
            self.insecure || !self.username.is_empty(),
            "no broker credentials (username/password); pass --insecure to connect unauthenticated"
        );
        Ok(())
    }
}

/// A dataset directory as given, or a Hub repo id (`owner/name`) found in the local LeRobot
/// cache: `$HF_LEROBOT_HOME/<id>`, `$HF_HOME/lerobot/<id>`, `~/.cache/huggingface/lerobot/<id>`
/// (where LeRobot downloads datasets). The agent never downloads: robots record their own.
/// Anything else is returned unchanged (with a warning when it does not exist: the worker
/// reports the error when a round needs the data).
pub fn resolve_dataset(d: &Path) -> PathBuf {
    if d.is_dir() {
        return d.to_path_buf();
    }
    let s = d.to_string_lossy();
    let is_repo_id = !d.is_absolute()
        && !s.starts_with('.')
        && s.split('/').count() == 2
        && s.split('/').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        });
    if is_repo_id {
        for root in lerobot_cache_roots() {
            let p = root.join(d);
            if p.is_dir() {
                return p;
            }
        }
    }
    tracing::warn!(
        dataset = %s,
        "dataset is neither a directory nor a repo id in the local LeRobot cache \
         ($HF_LEROBOT_HOME, $HF_HOME/lerobot, ~/.cache/huggingface/lerobot)"
    );
    d.to_path_buf()
}

fn lerobot_cache_roots() -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    [
        env("HF_LEROBOT_HOME"),
        env("HF_HOME").map(|h| h.join("lerobot")),
        env("HOME").map(|h| h.join(".cache/huggingface/lerobot")),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let mut c: AgentConfig = toml::from_str("client_id = \"r1\"\ninsecure = true\n").unwrap();
        c.validate().unwrap();
        c.client_id = "a/b".into();
        assert!(c.validate().is_err());
        c.client_id = "r1".into();
        c.insecure = false;
        assert!(c.validate().is_err());
        c.codec = "nope".into();
        c.insecure = true;
        assert!(c.validate().is_err());
        let c: AgentConfig = toml::from_str(
            "client_id = \"r1\"\ninsecure = true\nworker_output = \"params\"\nmodel_dir = \"m\"\nworker_args = [\"--threads\", \"1\"]\n",
        )
        .unwrap();
        assert_eq!(c.worker_output, WorkerOutput::Params);
        assert_eq!(c.model_dir, PathBuf::from("m"));
        assert_eq!(AgentConfig::default().worker_output, WorkerOutput::Delta);
        assert!(toml::from_str::<AgentConfig>("worker_output = \"weights\"\n").is_err());
        assert_eq!(AgentConfig::default().upload_max_bytes_per_sec, 0);
        let c: AgentConfig = toml::from_str("upload_max_bytes_per_sec = 250000\n").unwrap();
        assert_eq!(c.upload_max_bytes_per_sec, 250_000);
        assert!(toml::from_str::<AgentConfig>("upload_max_bytes_per_sec = -1\n").is_err());
    }
}
