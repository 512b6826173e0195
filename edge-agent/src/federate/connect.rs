//! MQTT plumbing: broker URL, rustls transport, client options with the last will, the task
//! that forwards the rumqttc event loop to the agent, and `now_ms`.
//!
//! The aggregator has copies of these; they stay together here, unpolished, until the shared
//! `zk0-daemon` crate replaces both.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rumqttc_ring::{Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use super::config::AgentConfig;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `mqtt://host:port` or `mqtts://host:port` → (tls, host, port).
pub fn parse_url(url: &str) -> Result<(bool, String, u16)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (false, r)
    } else {
        anyhow::bail!("broker URL {url:?} must start with mqtt:// or mqtts://");
    };
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((h, p)) => Ok((
            tls,
            h.to_string(),
            p.parse().with_context(|| format!("bad port in {url:?}"))?,
        )),
        None => Ok((tls, rest.to_string(), if tls { 8883 } else { 1883 })),
    }
}

/// An mqtts transport trusting only the CA certificates in `ca_pem` (ring provider).
pub fn tls_transport(ca_pem: &std::path::Path) -> Result<rumqttc_ring::Transport> {
    use rustls_ring::pki_types::pem::PemObject;
    let pem = std::fs::read(ca_pem)
        .with_context(|| format!("reading CA certificate {}", ca_pem.display()))?;
    let mut roots = rustls_ring::RootCertStore::empty();
    for cert in rustls_ring::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.with_context(|| format!("parsing {}", ca_pem.display()))?)?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "{} holds no certificate",
        ca_pem.display()
    );
    let provider = Arc::new(rustls_ring::crypto::ring::default_provider());
    let config = rustls_ring::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc_ring::Transport::tls_with_config(
        rumqttc_ring::TlsConfiguration::Rustls(Arc::new(config)),
    ))
}

/// Client options for `cfg`'s broker, with `will` (topic, payload) as the retained last will.
pub fn options(cfg: &AgentConfig, will: (String, Bytes)) -> Result<MqttOptions> {
    let (tls, host, port) = parse_url(&cfg.broker)?;
    let mut opts = MqttOptions::new(format!("zk0-agent-{}", cfg.client_id), host, port);
    opts.set_keep_alive(Duration::from_secs(15));
    // rumqttc's default 10 KiB cap cannot carry a model chunk.
    opts.set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes);
    opts.set_clean_session(true);
    if tls {
        opts.set_transport(tls_transport(&cfg.ca_file)?);
    }
    if !cfg.username.is_empty() {
        opts.set_credentials(cfg.username.clone(), cfg.password.clone());
    }
    opts.set_last_will(LastWill::new(will.0, will.1, QoS::AtLeastOnce, true));
    Ok(opts)
}

/// What the connection reports to the agent.
#[derive(Debug)]
pub enum MqttEvent {
    Connected,
    /// The connection failed (the event loop keeps reconnecting).
    Disconnected,
    /// An incoming publish; the payload is rumqttc's buffer, not a copy.
    Publish(String, Bytes),
}

/// Polls `eventloop` in a task of its own (so keep-alive never waits on the agent) until the
/// receiver is dropped.
pub fn spawn_forwarder(mut eventloop: EventLoop) -> mpsc::UnboundedReceiver<MqttEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = tx.send(MqttEvent::Connected);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(MqttEvent::Publish(p.topic, p.payload));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(MqttEvent::Disconnected);
                    tracing::warn!(error = %e, "MQTT connection lost; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}
