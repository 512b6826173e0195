//! Aggregator configuration: a TOML file, every field defaulted, with CLI overrides applied by
//! `main`.
//!
//! ```toml
//! federation = "demo"
//! state_dir = "/var/lib/zk0-aggregator"
//! insecure = false                 # plain MQTT without credentials: local demos only
//!
//! [broker]
//! url = ""                         # empty: run the embedded broker; else mqtt://host:port
//! listen = "0.0.0.0:1883"          # embedded broker listen address
//! max_packet_bytes = 4194304       # both broker and client limits; must exceed chunk_size
//! backlog_bytes = 67108864         # embedded broker: messages kept per subscription
//! username = ""                    # the aggregator's own login on an external broker
//! password = ""
//! tls_cert = ""                    # embedded broker: serve mqtts with this cert (PEM) …
//! tls_key = ""                     # … and key; see `zk0-aggregator certs init`
//! tls_ca = ""                      # CA the aggregator's own client trusts (mqtts)
//! require_client_cert = false     # embedded broker: admit only certificates from tls_ca
//! tls_client_cert = ""             # its client certificate for a broker requiring mTLS …
//! tls_client_key = ""              # … and key (`certs issue`)
//! [broker.users]                   # embedded broker: per-client username = password
//! robot-1 = "secret"
//!
//! [rounds]
//! rounds = 3                       # 0: forever
//! min_clients = 2
//! max_clients = 0                  # 0: no bound
//! fraction = 1.0
//! round_timeout_s = 600
//! local_steps = 10
//! lr = 1e-4
//! mu = 0.01
//! batch_size = 8
//! base_model = "lerobot/smolvla_base"
//! server_lr = 1.0
//! accepted_codecs = ["f32", "bf16", "int8", "topk:0.01"]
//! chunk_size = 1048576
//! max_update_bytes = 268435456
//! max_update_norm = 0.0            # absolute bound on ‖Δ‖₂ at receipt; 0: none
//! max_examples = 10000000          # bigger `examples` (the weight) is refused: weight_bound
//! strategy = "fedprox"             # "fedprox" (weighted FedAvg step) | "trimmed-mean" | "median"
//! trim_fraction = 0.1              # trimmed-mean: fraction cut at each end, per coordinate
//! norm_bound_multiple = 10.0       # with >= 3 updates, ‖Δ‖₂ over this × the round's median
//!                                  # is left out of the aggregate (norm_outlier); 0: off
//!
//! [metrics]
//! listen = "127.0.0.1:9464"        # Prometheus /metrics; empty disables
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::round::RoundConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub federation: String,
    pub state_dir: PathBuf,
    pub insecure: bool,
    pub broker: BrokerConfig,
    pub rounds: RoundsConfig,
    pub metrics: MetricsConfig,
    pub schedule: crate::schedule::ScheduleConfig,
    pub datasets: crate::datasets::DatasetsConfig,
    /// `[outputs]`: server evaluation, plots, checkpoints (see the `outputs` module).
    pub outputs: crate::outputs::OutputsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub url: String,
    pub listen: String,
    pub max_packet_bytes: usize,
    /// Embedded broker: bytes of messages kept per subscription. Past it the oldest are
    /// dropped (the aggregator then asks clients for lost chunks), so it bounds the broker's
    /// memory when uploads arrive faster than they are spooled. rumqttd keeps that much even
    /// once everything is read, so the default is small: it is memory the aggregator holds
    /// through the aggregation too.
    pub backlog_bytes: usize,
    pub username: String,
    pub password: String,
    pub users: BTreeMap<String, String>,
    /// Embedded broker: serve mqtts with this certificate chain and key (PEM), e.g. from
    /// `zk0-aggregator certs init`. Empty: plain MQTT.
    pub tls_cert: String,
    pub tls_key: String,
    /// CA (PEM) that signed the broker's certificate; used by the aggregator's own client for
    /// the embedded broker with TLS and for `mqtts://` external brokers.
    pub tls_ca: String,
    /// Embedded broker with TLS: admit only clients presenting a certificate from `tls_ca`
    /// (`zk0-aggregator certs issue`); see the `mtls` module.
    pub require_client_cert: bool,
    /// The aggregator's client certificate and key (PEM) for an `mqtts://` external broker
    /// that requires mutual TLS (`zk0-aggregator certs issue`). Empty: none.
    pub tls_client_cert: String,
    pub tls_client_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundsConfig {
    pub rounds: u64,
    pub min_clients: usize,
    pub max_clients: usize,
    pub fraction: f64,
    pub round_timeout_s: f64,
    pub local_steps: u32,
    pub lr: f64,
    pub mu: f64,
    pub batch_size: u32,
    pub base_model: String,
    pub server_lr: f64,
    pub accepted_codecs: Vec<String>,
    pub chunk_size: usize,
    pub max_update_bytes: u64,
    pub max_update_norm: f64,
    /// Largest `examples` (aggregation weight) an update may claim.
    pub max_examples: u64,
    pub strategy: Strategy,
    /// `trimmed-mean`: fraction of the values cut at each end of every coordinate, in [0, 0.5).
    pub trim_fraction: f64,
    /// Relative norm bound at round close (see `aggregate::norm_outliers`); 0 turns it off.
    pub norm_bound_multiple: f64,
}

/// How a round's accepted updates are combined (`rounds.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// `global += server_lr · Σ wᵢΔᵢ / Σ wᵢ` (the server step of FedProx / FedAvg).
    #[serde(rename = "fedprox")]
    FedProx,
    /// Coordinate-wise trimmed mean of the deltas, unweighted (Flower's FedTrimmedAvg).
    #[serde(rename = "trimmed-mean")]
    TrimmedMean,
    /// Coordinate-wise median of the deltas, unweighted (Flower's FedMedian).
    #[serde(rename = "median")]
    Median,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            federation: "default".into(),
            state_dir: PathBuf::from("zk0-aggregator-state"),
            insecure: false,
            broker: BrokerConfig::default(),
            rounds: RoundsConfig::default(),
            metrics: MetricsConfig::default(),
            schedule: Default::default(),
            datasets: Default::default(),
            outputs: Default::default(),
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: String::new(),
            listen: "0.0.0.0:1883".into(),
            max_packet_bytes: 4 << 20,
            backlog_bytes: 64 << 20,
            username: String::new(),
            password: String::new(),
            users: BTreeMap::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
            require_client_cert: false,
            tls_client_cert: String::new(),
            tls_client_key: String::new(),
        }
    }
}

impl Default for RoundsConfig {
    fn default() -> Self {
        RoundsConfig {
            rounds: 3,
            min_clients: 2,
            max_clients: 0,
            fraction: 1.0,
            round_timeout_s: 600.0,
            local_steps: 10,
            lr: 1e-4,
            mu: 0.01,
            batch_size: 8,
            base_model: "lerobot/smolvla_base".into(),
            server_lr: 1.0,
            accepted_codecs: vec![
                "f32".into(),
                "bf16".into(),
                "int8".into(),
                "topk:0.01".into(),
            ],
            chunk_size: 1 << 20,
            max_update_bytes: 256 << 20,
            max_update_norm: 0.0,
            max_examples: 10_000_000,
            strategy: Strategy::FedProx,
            trim_fraction: 0.1,
            norm_bound_multiple: 10.0,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl Config {
    /// Reads a TOML file; a missing `path` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Checks the combinations a TOML schema cannot express.
    pub fn validate(&self) -> Result<()> {
        let r = &self.rounds;
        anyhow::ensure!(
            r.chunk_size >= 1024,
            "rounds.chunk_size must be at least 1024"
        );
        // Chunk plus topic and MQTT header must fit in one packet on both ends.
        anyhow::ensure!(
            self.broker.max_packet_bytes >= r.chunk_size + 4096,
            "broker.max_packet_bytes ({}) must exceed rounds.chunk_size ({}) by 4 KiB",
            self.broker.max_packet_bytes,
            r.chunk_size
        );
        anyhow::ensure!(
            r.round_timeout_s > 0.0 && r.round_timeout_s.is_finite(),
            "rounds.round_timeout_s must be > 0"
        );
        anyhow::ensure!(r.server_lr.is_finite(), "rounds.server_lr must be finite");
        anyhow::ensure!(r.max_examples > 0, "rounds.max_examples must be > 0");
        anyhow::ensure!(
            (0.0..0.5).contains(&r.trim_fraction),
            "rounds.trim_fraction must be in [0, 0.5)"
        );
        anyhow::ensure!(
            r.norm_bound_multiple == 0.0
                || (r.norm_bound_multiple >= 1.0 && r.norm_bound_multiple.is_finite()),
            "rounds.norm_bound_multiple must be 0 (off) or a finite value >= 1"
        );
        anyhow::ensure!(
            !r.accepted_codecs.is_empty(),
            "rounds.accepted_codecs is empty"
        );
        for c in &r.accepted_codecs {
            c.parse::<shared_proto::codec::Codec>()
                .map_err(|e| anyhow::anyhow!("rounds.accepted_codecs: {c:?}: {e}"))?;
        }
        anyhow::ensure!(
            self.broker.tls_cert.is_empty() == self.broker.tls_key.is_empty(),
            "broker.tls_cert and broker.tls_key go together"
        );
        anyhow::ensure!(
            !self.broker.require_client_cert || !self.broker.tls_cert.is_empty(),
            "broker.require_client_cert needs broker.tls_cert/tls_key (mutual TLS is TLS)"
        );
        anyhow::ensure!(
            self.broker.tls_client_cert.is_empty() == self.broker.tls_client_key.is_empty(),
            "broker.tls_client_cert and broker.tls_client_key go together"
        );
        if !self.broker.tls_cert.is_empty() || self.broker.url.starts_with("mqtts://") {
            anyhow::ensure!(
                !self.broker.tls_ca.is_empty(),
                "TLS needs broker.tls_ca (the CA to trust)"
            );
        }
        self.schedule.validate().map_err(anyhow::Error::msg)?;
        self.datasets.validate().map_err(anyhow::Error::msg)?;
        self.outputs.validate()?;
        if !self.insecure {
            let authenticated = if self.broker.url.is_empty() {
                !self.broker.users.is_empty()
            } else {
                !self.broker.username.is_empty()
            };
            anyhow::ensure!(
                authenticated,
                "no broker credentials configured ([broker.users] for the embedded broker, \
                 broker.username for an external one); pass --insecure to run plain and unauthenticated"
            );
        }
        Ok(())
    }

    /// The round's limits on one update, for the intake and the verifier.
    pub fn limits(&self) -> crate::verify::Limits {
        let r = &self.rounds;
        crate::verify::Limits {
            chunk_size: u32::try_from(r.chunk_size).unwrap_or(u32::MAX),
            max_update_bytes: r.max_update_bytes,
            max_update_norm: r.max_update_norm,
            max_examples: r.max_examples,
            // `validate` checked they parse.
            accepted_codecs: r
                .accepted_codecs
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect(),
        }
    }

    pub fn round_config(&self) -> RoundConfig {
        RoundConfig {
            rounds: self.rounds.rounds,
            min_clients: self.rounds.min_clients,
            max_clients: self.rounds.max_clients,
            fraction: self.rounds.fraction,
            round_timeout_ms: (self.rounds.round_timeout_s * 1000.0) as u64,
        }
    }

    /// How round close combines the accepted updates.
    pub fn aggregation(&self) -> crate::aggregate::Aggregation {
        let r = &self.rounds;
        crate::aggregate::Aggregation {
            strategy: r.strategy,
            trim_fraction: r.trim_fraction,
            server_lr: r.server_lr,
            norm_bound_multiple: r.norm_bound_multiple,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partial_toml_with_defaults() {
        let c: Config = toml::from_str("federation = \"x\"\n[rounds]\nmin_clients = 3\n").unwrap();
        assert_eq!(c.federation, "x");
        assert_eq!(c.rounds.min_clients, 3);
        assert_eq!(c.rounds.chunk_size, 1 << 20);
    }

    #[test]
    fn requires_credentials_or_insecure() {
        let mut c = Config::default();
        assert!(c.validate().is_err());
        c.insecure = true;
        c.validate().unwrap();
        c.insecure = false;
        c.broker.users.insert("a".into(), "b".into());
        c.validate().unwrap();
        c.broker.max_packet_bytes = 1000;
        assert!(c.validate().is_err());
    }

    #[test]
    fn robust_aggregation_keys_parse_and_are_checked() {
        let c = Config::default();
        assert_eq!(c.rounds.strategy, Strategy::FedProx);
        assert_eq!(
            c.rounds.norm_bound_multiple, 10.0,
            "the relative bound is on by default"
        );
        let mut c: Config = toml::from_str(
            "insecure = true\n[rounds]\nstrategy = \"trimmed-mean\"\ntrim_fraction = 0.2\n",
        )
        .unwrap();
        assert_eq!(c.rounds.strategy, Strategy::TrimmedMean);
        c.validate().unwrap();
        assert!(toml::from_str::<Config>("[rounds]\nstrategy = \"krum\"\n").is_err());
        c.rounds.trim_fraction = 0.5;
        assert!(c.validate().is_err());
        c.rounds.trim_fraction = 0.1;
        c.rounds.norm_bound_multiple = 0.5;
        assert!(c.validate().is_err());
        c.rounds.norm_bound_multiple = 0.0;
        c.rounds.max_examples = 0;
        assert!(c.validate().is_err());
    }
}
