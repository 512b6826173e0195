//! Connecting to the broker: an [`AsyncClient`] for publishing, and a task that polls the
//! connection and forwards what arrives into a **bounded** [`Inbox`].
//!
//! The task keeps polling (keep-alive, acks) however busy the daemon is. When the inbox is
//! full it applies back-pressure, except for publishes the caller marked sheddable (bulk data
//! the protocol can ask for again, such as update chunks): those are dropped and counted, so
//! a flood cannot grow memory without bound. Payloads travel as the `Bytes` rumqttc read them
//! into, never copied.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc_ring::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::{BrokerUrl, Error};

/// The MQTT client id of the agent of zk0 client `client_id`. The embedded broker lets broker
/// login `client_id` connect under this id only, so one robot's password can neither act as
/// another robot nor take over its session.
pub fn agent_client_id(client_id: &str) -> String {
    format!("zk0-agent-{client_id}")
}

/// The MQTT client id of the aggregator of `federation` (the only id its login may use).
pub fn aggregator_client_id(federation: &str) -> String {
    format!("zk0-aggregator-{federation}")
}

/// What the connection task hands the daemon.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// A (re)connection was accepted: subscribe and republish retained state now. `session`
    /// numbers the connection (larger each time; see [`Settings::last_will`]).
    Connected {
        session: u64,
    },
    /// The connection dropped; the task retries by itself.
    Disconnected,
    Publish {
        topic: String,
        payload: Bytes,
    },
}

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct Settings {
    pub client_id: String,
    pub broker: BrokerUrl,
    /// CA certificate to trust, used when `broker.tls`.
    pub ca_file: PathBuf,
    /// Client certificate chain and key (PEM) for a broker that requires mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub credentials: Option<(String, String)>,
    /// Largest packet either way; rumqttc's 10 KiB default cannot carry a chunk.
    pub max_packet_bytes: usize,
    pub keep_alive: Duration,
    /// Makes the last will for a connection from its session number, before every
    /// (re)connect, so a signed will can name the session it ends (the same number then comes
    /// with [`Incoming::Connected`]).
    pub last_will: Option<WillFn>,
    /// Publishes the client may queue before `publish` waits.
    pub request_capacity: usize,
    /// Incoming events the inbox holds before back-pressure or shedding starts.
    pub inbox_capacity: usize,
    pub retry_delay: Duration,
}

impl Settings {
    /// Defaults: 15 s keep-alive, clean session, 1 MiB + slack packets, a 64-event inbox.
    pub fn new(client_id: impl Into<String>, broker: BrokerUrl) -> Self {
        Settings {
            client_id: client_id.into(),
            broker,
            ca_file: PathBuf::new(),
            client_cert: None,
            credentials: None,
            max_packet_bytes: (1 << 20) + (64 << 10),
            keep_alive: Duration::from_secs(15),
            last_will: None,
            request_capacity: 1024,
            inbox_capacity: 64,
            retry_delay: Duration::from_millis(500),
        }
    }
}

/// Builds the last will of the connection numbered by its argument.
#[derive(Clone)]
pub struct WillFn(Arc<dyn Fn(u64) -> LastWill + Send + Sync>);

impl WillFn {
    pub fn new(f: impl Fn(u64) -> LastWill + Send + Sync + 'static) -> Self {
        WillFn(Arc::new(f))
    }

    pub fn will(&self, session: u64) -> LastWill {
        (self.0)(session)
    }
}

impl std::fmt::Debug for WillFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WillFn")
    }
}

/// Increasing numbers from the clock (connection sessions, sequence numbers of signed
/// messages): Unix milliseconds, but always larger than the last one, so they increase across
/// reconnects and (with a sane clock) across restarts, with nothing to persist.
#[derive(Debug, Default)]
pub struct Sequence(u64);

impl Sequence {
    pub fn next(&mut self, now_ms: u64) -> u64 {
        self.0 = now_ms.max(self.0.saturating_add(1));
        self.0
    }
}

/// Which publishes may be dropped when the inbox is full, and who hears about it.
pub struct Shedding {
    sheddable: Box<dyn Fn(&str) -> bool + Send + Sync>,
    on_shed: Box<dyn Fn(&str, usize) + Send + Sync>,
}

impl std::fmt::Debug for Shedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shedding")
    }
}

impl Shedding {
    /// Never drop: a full inbox always applies back-pressure.
    pub fn never() -> Self {
        Self::when(|_| false)
    }

    /// Drop publishes whose topic satisfies `sheddable` when the inbox is full.
    pub fn when(sheddable: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Shedding {
            sheddable: Box::new(sheddable),
            on_shed: Box::new(|_, _| {}),
        }
    }

    /// Also call `f(topic, payload_len)` for each dropped publish (a metric, a log line).
    pub fn on_shed(mut self, f: impl Fn(&str, usize) + Send + Sync + 'static) -> Self {
        self.on_shed = Box::new(f);
        self
    }
}

#[derive(Debug, Default)]
struct ShedCount {
    messages: AtomicU64,
    bytes: AtomicU64,
}

/// The receiving end: events in arrival order, minus what was shed.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Incoming>,
    shed: Arc<ShedCount>,
}

impl Inbox {
    /// The next event; `None` once the connection task has ended.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    /// Publishes dropped because the inbox was full: (messages, payload bytes).
    pub fn shed(&self) -> (u64, u64) {
        (
            self.shed.messages.load(Ordering::Relaxed),
            self.shed.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Connects (lazily: the task's first poll does it) and starts the forwarding task.
pub fn connect(settings: Settings, shedding: Shedding) -> Result<(AsyncClient, Inbox), Error> {
    let s = settings;
    let mut opts = MqttOptions::new(s.client_id, s.broker.host.clone(), s.broker.port);
    opts.set_keep_alive(s.keep_alive);
    opts.set_max_packet_size(s.max_packet_bytes, s.max_packet_bytes);
    opts.set_clean_session(true);
    if s.broker.tls {
        let identity = s
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        opts.set_transport(crate::tls::client_transport_with(&s.ca_file, identity)?);
    }
    if let Some((u, p)) = s.credentials {
        opts.set_credentials(u, p);
    }
    let will = s.last_will;
    let mut sessions = Sequence::default();
    let mut session = sessions.next(crate::now_ms());
    if let Some(w) = &will {
        opts.set_last_will(w.will(session));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, s.request_capacity.max(1));
    let (tx, rx) = mpsc::channel(s.inbox_capacity.max(1));
    let shed = Arc::new(ShedCount::default());
    let count = shed.clone();
    let retry = s.retry_delay;
    tokio::spawn(async move {
        loop {
            let forwarded = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tx.send(Incoming::Connected { session }).await
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if (shedding.sheddable)(&p.topic) {
                        let len = p.payload.len();
                        let ev = Incoming::Publish {
                            topic: p.topic,
                            payload: p.payload,
                        };
                        match tx.try_send(ev) {
                            Ok(()) => Ok(()),
                            Err(mpsc::error::TrySendError::Full(Incoming::Publish {
                                topic,
                                ..
                            })) => {
                                count.messages.fetch_add(1, Ordering::Relaxed);
                                count.bytes.fetch_add(len as u64, Ordering::Relaxed);
                                (shedding.on_shed)(&topic, len);
                                Ok(())
                            }
                            Err(e) => Err(mpsc::error::SendError(e.into_inner())),
                        }
                    } else {
                        let ev = Incoming::Publish {
                            topic: p.topic,
                            payload: p.payload,
                        };
                        tx.send(ev).await
                    }
                }
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT connection lost; retrying");
                    let r = tx.send(Incoming::Disconnected).await;
                    tokio::time::sleep(retry).await;
                    // The next poll reconnects: as a new session, with its own will.
                    session = sessions.next(crate::now_ms());
                    if let Some(w) = &will {
                        eventloop.mqtt_options.set_last_will(w.will(session));
                    }
                    r
                }
            };
            if forwarded.is_err() || tx.is_closed() {
                return; // the daemon dropped its inbox
            }
        }
    });
    Ok((client, Inbox { rx, shed }))
}

/// Publishes at QoS 1, logging (not returning) a failure: the client only fails when its
/// request queue is closed, i.e. the daemon is shutting down.
pub async fn publish_logged(
    client: &AsyncClient,
    topic: String,
    payload: impl Into<Bytes>,
    retain: bool,
) {
    if let Err(e) = client
        .publish_bytes(topic.clone(), QoS::AtLeastOnce, retain, payload.into())
        .await
    {
        tracing::warn!(%topic, error = %e, "publish failed");
    }
}

#[cfg(test)]
mod tests {
    use super::Sequence;

    #[test]
    fn sessions_increase_even_when_the_clock_does_not() {
        let mut c = Sequence::default();
        assert_eq!(c.next(1_000), 1_000);
        assert_eq!(c.next(1_000), 1_001, "two connects in one millisecond");
        assert_eq!(c.next(500), 1_002, "the clock stepped back");
        assert_eq!(c.next(5_000), 5_000);
    }
}
