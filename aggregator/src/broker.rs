//! The embedded MQTT broker (rumqttd), run on its own threads inside the aggregator process.
//!
//! The aggregator then talks to it as an ordinary MQTT client over loopback, exactly as it talks
//! to an external broker, so both deployments share one code path.

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
use shared_proto::sign::KeyPair;
use zk0_daemon::BrokerUrl;

/// The broker the aggregator connects to, and its credentials there: the embedded one
/// (started here; the aggregator gets random credentials of its own unless insecure) unless
/// `broker.url` names an external one.
pub fn start_or_connect(
    cfg: &crate::config::Config,
) -> Result<(BrokerUrl, Option<(String, String)>)> {
    let b = &cfg.broker;
    if !b.url.is_empty() {
        let me = (!b.username.is_empty()).then(|| (b.username.clone(), b.password.clone()));
        return Ok((BrokerUrl::parse(&b.url)?, me));
    }
    let listen: SocketAddr = b.listen.parse().context("broker.listen")?;
    let (users, me) = if cfg.insecure {
        (None, None)
    } else {
        let pass =
            shared_proto::hash::sha256_hex(&KeyPair::generate().sign(b"zk0-aggregator-login"));
        let mut u: HashMap<String, String> = b.users.clone().into_iter().collect();
        u.insert("zk0-aggregator".into(), pass.clone());
        (Some(u), Some(("zk0-aggregator".to_string(), pass)))
    };
    EmbeddedBroker {
        listen,
        max_packet_bytes: b.max_packet_bytes,
        backlog_bytes: b.backlog_bytes,
        users,
        tls: (!b.tls_cert.is_empty()).then(|| (b.tls_cert.clone(), b.tls_key.clone())),
    }
    .spawn()?;
    tracing::info!(%listen, "embedded MQTT broker started");
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        listen.ip().to_string()
    };
    let url = BrokerUrl {
        tls: !b.tls_cert.is_empty(),
        host,
        port: listen.port(),
    };
    Ok((url, me))
}

/// Settings for the embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    pub listen: SocketAddr,
    /// Largest MQTT packet accepted from a client (chunks plus headers must fit).
    pub max_packet_bytes: usize,
    /// Unread bytes kept per subscription before the oldest are dropped.
    pub backlog_bytes: usize,
    /// username → password; `None` accepts anyone (insecure mode).
    pub users: Option<HashMap<String, String>>,
    /// (certificate chain, key) PEM paths: serve mqtts instead of plain MQTT.
    pub tls: Option<(String, String)>,
}

impl EmbeddedBroker {
    fn segment_size(&self) -> usize {
        (self.max_packet_bytes * 4).max(16 << 20)
    }

    fn config(&self) -> Config {
        let connections = ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: self.max_packet_bytes,
            // Retained messages for a subscription are forwarded only up to the free inflight
            // slots (rumqttd drops the rest), so keep this well above the agents' fetch window.
            max_inflight_count: 500,
            auth: self.users.clone(),
            external_auth: None,
            dynamic_filters: true,
        };
        let server = ServerSettings {
            name: "zk0-v4".into(),
            listen: self.listen,
            tls: self
                .tls
                .clone()
                .map(|(certpath, keypath)| TlsConfig::Rustls {
                    capath: None,
                    certpath,
                    keypath,
                }),
            next_connection_delay_ms: 1,
            connections,
        };
        let router = RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            // A segment must hold at least one whole packet; the segment count sets the
            // backlog a slow subscriber may have before rumqttd drops its oldest messages.
            max_segment_size: self.segment_size(),
            max_segment_count: self.backlog_bytes.div_ceil(self.segment_size()).max(2),
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        Config {
            id: 0,
            router,
            v4: Some(HashMap::from([("1".to_string(), server)])),
            ..Default::default()
        }
    }

    /// Starts the broker on background threads; they live as long as the process.
    pub fn spawn(&self) -> Result<()> {
        if let Some((cert, key)) = &self.tls {
            // rumqttd only logs a bad path; fail loudly instead.
            for p in [cert, key] {
                anyhow::ensure!(std::path::Path::new(p).is_file(), "TLS file {p} not found");
            }
        }
        // Fail early with a clear message if the port is taken: rumqttd would only log it.
        drop(
            std::net::TcpListener::bind(self.listen)
                .with_context(|| format!("embedded broker cannot listen on {}", self.listen))?,
        );
        let mut broker = Broker::new(self.config());
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .context("spawning the broker thread")?;
        Ok(())
    }
}
