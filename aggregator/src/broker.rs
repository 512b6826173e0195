//! The embedded MQTT broker (rumqttd), run on its own threads inside the aggregator process.
//!
//! The aggregator then talks to it as an ordinary MQTT client over loopback, exactly as it talks
//! to an external broker, so both deployments share one code path. One exception: the global
//! model's retained messages go through rumqttd's in-process link ([`ModelLink`]), so the broker
//! holds the very `Bytes` the aggregator hands it (slices of the mapped model file) instead of
//! copies read from a socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use rumqttd::local::LinkTx;
use rumqttd::{
    Broker, Config, ConnectionSettings, MetricSettings, MetricType, RouterConfig, ServerSettings,
    TlsConfig,
};
use shared_proto::sign::KeyPair;
use shared_proto::topic::Topics;
use zk0_daemon::{mqtt, BrokerUrl};

use crate::metrics::{FilterLabel, Metrics, ReasonLabel};

/// How the aggregator reaches its broker.
pub struct BrokerAccess {
    pub url: BrokerUrl,
    /// The aggregator's login there (none when insecure or the external broker needs none).
    pub login: Option<(String, String)>,
    /// The in-process link for the model's retained messages: embedded broker only.
    pub model_link: Option<ModelLink>,
}

/// The broker the aggregator connects to, and its credentials there: the embedded one
/// (started here; the aggregator gets random credentials of its own unless insecure) unless
/// `broker.url` names an external one.
pub fn start_or_connect(
    cfg: &crate::config::Config,
    metrics: &Arc<Metrics>,
) -> Result<BrokerAccess> {
    let b = &cfg.broker;
    if !b.url.is_empty() {
        let me = (!b.username.is_empty()).then(|| (b.username.clone(), b.password.clone()));
        return Ok(BrokerAccess {
            url: BrokerUrl::parse(&b.url)?,
            login: me,
            model_link: None,
        });
    }
    let models = Topics::new(&cfg.federation)
        .context("federation name")?
        .all_models();
    let listen: SocketAddr = b.listen.parse().context("broker.listen")?;
    if b.require_client_cert {
        return start_behind_mtls_front(cfg, listen, metrics, models);
    }
    let host = self_connect_host(listen, b)?;
    let (logins, me) = logins(cfg);
    let link = EmbeddedBroker {
        listen,
        max_packet_bytes: b.max_packet_bytes,
        backlog_bytes: b.backlog_bytes,
        logins,
        metrics: metrics.clone(),
        tls: (!b.tls_cert.is_empty()).then(|| (b.tls_cert.clone(), b.tls_key.clone())),
    }
    .spawn(&models)?;
    tracing::info!(%listen, "embedded MQTT broker started");
    let url = BrokerUrl {
        tls: !b.tls_cert.is_empty(),
        host,
        port: listen.port(),
    };
    Ok(BrokerAccess {
        url,
        login: me,
        model_link: Some(link),
    })
}

/// `broker.require_client_cert`: rumqttd on a loopback port of its own, plain, and the
/// [`crate::mtls`] front on `listen`. The aggregator dials rumqttd directly (loopback, still
/// with its login), so it needs no client certificate of its own.
fn start_behind_mtls_front(
    cfg: &crate::config::Config,
    listen: SocketAddr,
    metrics: &Arc<Metrics>,
    models: String,
) -> Result<BrokerAccess> {
    let b = &cfg.broker;
    let public = std::net::TcpListener::bind(listen)
        .with_context(|| format!("embedded broker cannot listen on {listen}"))?;
    // A free loopback port for rumqttd (released, then bound by rumqttd: a short race that
    // `spawn` reports as a bind failure).
    let inner = std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?;
    let (logins, me) = logins(cfg);
    let link = EmbeddedBroker {
        listen: inner,
        max_packet_bytes: b.max_packet_bytes,
        backlog_bytes: b.backlog_bytes,
        logins,
        metrics: metrics.clone(),
        tls: None,
    }
    .spawn(&models)?;
    crate::mtls::spawn_front(
        public,
        std::path::Path::new(&b.tls_cert),
        std::path::Path::new(&b.tls_key),
        std::path::Path::new(&b.tls_ca),
        inner,
        metrics.clone(),
    )?;
    tracing::info!(%listen, "embedded MQTT broker started (mutual TLS: client certificates from broker.tls_ca)");
    let url = BrokerUrl {
        tls: false,
        host: inner.ip().to_string(),
        port: inner.port(),
    };
    Ok(BrokerAccess {
        url,
        login: me,
        model_link: Some(link),
    })
}

/// The embedded broker's logins and the aggregator's own (none when insecure).
fn logins(cfg: &crate::config::Config) -> (Option<Logins>, Option<(String, String)>) {
    let b = &cfg.broker;
    if cfg.insecure {
        (None, None)
    } else {
        let pass =
            shared_proto::hash::sha256_hex(&KeyPair::generate().sign(b"zk0-aggregator-login"));
        let me = Login {
            password: pass.clone(),
            client_id: mqtt::aggregator_client_id(&cfg.federation),
        };
        (
            Some(Logins::for_clients(&b.users, AGGREGATOR_LOGIN, me)),
            Some((AGGREGATOR_LOGIN.to_string(), pass)),
        )
    }
}

/// The embedded broker login of the aggregator itself (its password is random per start).
pub const AGGREGATOR_LOGIN: &str = "zk0-aggregator";

/// One broker login: its password and the one MQTT client id it may connect with.
#[derive(Debug, Clone)]
pub struct Login {
    pub password: String,
    pub client_id: String,
}

/// The embedded broker's logins, checked at CONNECT (rumqttd's `external_auth` hook): the
/// password, and that the client id is the login's own. Login `robot-a` of `[broker.users]` is
/// zk0 client `robot-a` and connects as [`mqtt::agent_client_id`]`("robot-a")`, so robot A's
/// password cannot connect as robot B, nor take over B's session by reusing B's client id.
#[derive(Debug, Clone, Default)]
pub struct Logins(HashMap<String, Login>);

impl Logins {
    /// `[broker.users]` (username = zk0 client id → password) plus the aggregator's own login.
    pub fn for_clients<'a>(
        users: impl IntoIterator<Item = (&'a String, &'a String)>,
        me_user: &str,
        me: Login,
    ) -> Logins {
        let mut m: HashMap<String, Login> = users
            .into_iter()
            .map(|(u, p)| {
                let login = Login {
                    password: p.clone(),
                    client_id: mqtt::agent_client_id(u),
                };
                (u.clone(), login)
            })
            .collect();
        m.insert(me_user.to_string(), me);
        Logins(m)
    }

    /// Whether `username`/`password` may connect as MQTT client `client_id`; why not if not
    /// (`unknown_login`, `wrong_password`, `foreign_client_id`: also the metric's reasons).
    pub fn check(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<(), &'static str> {
        let Some(login) = self.0.get(username) else {
            return Err("unknown_login");
        };
        if !constant_time_eq(login.password.as_bytes(), password.as_bytes()) {
            return Err("wrong_password");
        }
        if login.client_id != client_id {
            return Err("foreign_client_id"); // not the login's own
        }
        Ok(())
    }
}

/// Equality whose time does not depend on where the inputs differ (only on their lengths).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The host name the aggregator dials its embedded broker by: the listen address, or loopback
/// when it listens on every interface. With TLS it must be a name the broker certificate was
/// issued for (rustls checks the dialled name), so it is the first candidate the certificate
/// passes for, checked against `tls_ca` now; a certificate that fits none (issued only for the
/// public name, expired, or from another CA) fails here with the reason, instead of leaving
/// the aggregator retrying a connection it can never make.
fn self_connect_host(listen: SocketAddr, b: &crate::config::BrokerConfig) -> Result<String> {
    let candidates: Vec<String> = if listen.ip().is_unspecified() {
        crate::tls::LOOPBACK_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        vec![listen.ip().to_string()]
    };
    if b.tls_cert.is_empty() {
        return Ok(candidates[0].clone());
    }
    let (ca, cert) = (
        std::path::Path::new(&b.tls_ca),
        std::path::Path::new(&b.tls_cert),
    );
    let mut why = Vec::new();
    for name in &candidates {
        match zk0_daemon::tls::check_server_cert(ca, cert, name) {
            Ok(()) => return Ok(name.clone()),
            Err(e) => why.push(e.to_string()),
        }
    }
    anyhow::bail!(
        "the aggregator cannot reach its own broker over TLS (it dials {}): {}; \
         `zk0-aggregator certs init --san <host>` issues a certificate that fits",
        candidates.join(" or "),
        why.join("; ")
    )
}

/// Settings for the embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    pub listen: SocketAddr,
    /// Largest MQTT packet accepted from a client (chunks plus headers must fit).
    pub max_packet_bytes: usize,
    /// Unread bytes kept per subscription before the oldest are dropped.
    pub backlog_bytes: usize,
    /// Who may connect, as which client id; `None` accepts anyone (insecure mode).
    pub logins: Option<Logins>,
    /// Counts refused CONNECTs.
    pub metrics: Arc<Metrics>,
    /// (certificate chain, key) PEM paths: serve mqtts instead of plain MQTT.
    pub tls: Option<(String, String)>,
}

impl EmbeddedBroker {
    fn segment_size(&self) -> usize {
        (self.max_packet_bytes * 4).max(16 << 20)
    }

    fn config(&self) -> Config {
        let mut connections = ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: self.max_packet_bytes,
            // Retained messages for a subscription are forwarded only up to the free inflight
            // slots (rumqttd drops the rest), so keep this well above the agents' fetch window.
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        if let Some(logins) = self.logins.clone() {
            let metrics = self.metrics.clone();
            connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
                let verdict = logins.check(&client_id, &user, &pass);
                if let Err(why) = verdict {
                    tracing::warn!(%client_id, login = %user, why, "broker refused a CONNECT");
                    metrics
                        .broker_connects_refused
                        .get_or_create(&ReasonLabel {
                            reason: why.to_string(),
                        })
                        .inc();
                }
                std::future::ready(verdict.is_ok())
            });
        }
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
        // Alerts (cursor jumps, see `count_backlog_overruns`) reach the alert link only on
        // this timer, every second. rumqttd's timer unwraps both intervals, so meters get one
        // too (an hour: nothing reads them). The settings type has private fields and is built
        // from its serde form.
        let every = |secs: u64| -> Option<MetricSettings> {
            serde_json::from_value(serde_json::json!({ "push_interval": secs })).ok()
        };
        let metrics = every(1)
            .zip(every(3600))
            .map(|(a, m)| HashMap::from([(MetricType::Alerts, a), (MetricType::Meters, m)]));
        Config {
            id: 0,
            router,
            v4: Some(HashMap::from([("1".to_string(), server)])),
            metrics,
            ..Default::default()
        }
    }

    /// Starts the broker on background threads (they live as long as the process) and opens
    /// the in-process link that publishes under `models` (an MQTT filter).
    pub fn spawn(&self, models: &str) -> Result<ModelLink> {
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
        // The router runs from `new`, so the link connects before the listeners start.
        let link = ModelLink::open(&broker, models)?;
        count_backlog_overruns(&broker, self.metrics.clone())?;
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .context("spawning the broker thread")?;
        Ok(link)
    }
}

/// Counts rumqttd's cursor jumps (a subscriber that fell a whole backlog behind loses what it
/// had not read) on `broker_backlog_overruns`, from the router's alert link on a thread of its
/// own: the aggregator cannot see these drops over MQTT, and a flood must not go uncounted.
fn count_backlog_overruns(broker: &Broker, metrics: Arc<Metrics>) -> Result<()> {
    let alerts = broker.alerts().context("opening the broker's alert link")?;
    std::thread::Builder::new()
        .name("rumqttd-alerts".into())
        .spawn(move || {
            // Ends when the router goes, with the process.
            while let Ok(batch) = alerts.router_rx.recv() {
                // rumqttd does not export the alert's kind type: read its name and text.
                for alert in batch.iter().filter(|a| a.kind.name() == "cursor_jump") {
                    let text = alert.kind.description();
                    let filter = cursor_jump_filter(&text).to_string();
                    tracing::warn!(%filter, client = %alert.client_id,
                        "broker backlog overrun: a subscriber lost unread messages");
                    metrics
                        .broker_backlog_overruns
                        .get_or_create(&FilterLabel { filter })
                        .inc();
                }
            }
        })
        .context("spawning the broker's alert thread")?;
    Ok(())
}

/// The filter in a cursor-jump alert's text (`Filter: <filter>, Lost: <n>`), or the text.
fn cursor_jump_filter(text: &str) -> &str {
    text.strip_prefix("Filter: ")
        .and_then(|t| t.rsplit_once(", Lost: "))
        .map_or(text, |(f, _)| f)
}

/// The aggregator's in-process link into the embedded broker, for the global model's retained
/// messages. rumqttd keeps the very `Bytes` it is handed ([`crate::model_file`] slices), where a
/// publish over the loopback MQTT connection would first wait in the client's queue and then
/// land in the broker as a copy read from its socket: once a whole model, held beside the
/// aggregator's own.
///
/// A local link publishes at QoS 0; the broker still delivers to each subscriber at the QoS it
/// subscribed with (agents: 1). Its client id is random, so no MQTT client can take it over.
pub struct ModelLink {
    tx: LinkTx,
}

impl std::fmt::Debug for ModelLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelLink")
    }
}

impl ModelLink {
    /// Connects to `broker`'s router and subscribes to `models`, which every publish of the
    /// link must match: rumqttd drops a local link whose publish matches no subscription. What
    /// that subscription brings back (the link's own messages, and anyone else's on the model
    /// topics) is drained and dropped on a thread of its own; the guard against overwrites
    /// watches through the aggregator's MQTT connection as with any broker.
    fn open(broker: &Broker, models: &str) -> Result<ModelLink> {
        let id = format!(
            "zk0-aggregator-link-{}",
            shared_proto::hash::sha256_hex(&KeyPair::generate().sign(b"zk0-link"))
        );
        let (mut tx, mut rx) = broker
            .link(&id)
            .map_err(|e| anyhow::anyhow!("embedded broker link: {e}"))?;
        tx.subscribe(models)
            .map_err(|e| anyhow::anyhow!("embedded broker link: {e}"))?;
        std::thread::Builder::new()
            .name("rumqttd-link".into())
            .spawn(move || loop {
                match rx.recv() {
                    // The router paused the link for want of room: it has room again.
                    Ok(Some(rumqttd::Notification::Unschedule)) => {
                        if rx.ready().is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return, // the broker is gone
                }
            })
            .context("spawning the broker link thread")?;
        Ok(ModelLink { tx })
    }

    /// Publishes `payload` on `topic` (retained or not) as is, without a copy.
    pub async fn publish(&mut self, topic: String, payload: Bytes, retain: bool) -> Result<()> {
        let publish = rumqttd::protocol::Publish::new(Bytes::from(topic), payload, retain);
        self.tx
            .send(rumqttd::protocol::Packet::Publish(publish, None))
            .await
            .map_err(|e| anyhow::anyhow!("embedded broker link: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_connects_only_as_its_own_client_id() {
        let users = [
            ("robot-a".to_string(), "pw-a".to_string()),
            ("robot-b".to_string(), "pw-b".to_string()),
        ];
        let me = Login {
            password: "pw-agg".into(),
            client_id: mqtt::aggregator_client_id("fed"),
        };
        let l = Logins::for_clients(users.iter().map(|(u, p)| (u, p)), AGGREGATOR_LOGIN, me);
        let a = mqtt::agent_client_id("robot-a");
        assert_eq!(l.check(&a, "robot-a", "pw-a"), Ok(()));
        assert_eq!(
            l.check("zk0-aggregator-fed", AGGREGATOR_LOGIN, "pw-agg"),
            Ok(())
        );
        // A's password as B, or under any other id: refused.
        let b = mqtt::agent_client_id("robot-b");
        assert_eq!(l.check(&b, "robot-a", "pw-a"), Err("foreign_client_id"));
        assert_eq!(
            l.check("zk0-aggregator-fed", "robot-a", "pw-a"),
            Err("foreign_client_id")
        );
        assert_eq!(l.check(&a, "robot-a", "pw-b"), Err("wrong_password"));
        assert_eq!(l.check(&a, "robot-c", "pw-a"), Err("unknown_login"));
        assert_eq!(l.check(&a, "robot-a", ""), Err("wrong_password"));
    }

    #[test]
    fn cursor_jump_text_gives_its_filter() {
        assert_eq!(
            cursor_jump_filter("Filter: zk0/v1/f/client/+/update/#, Lost: 0"),
            "zk0/v1/f/client/+/update/#"
        );
        assert_eq!(cursor_jump_filter("something else"), "something else");
    }
}
