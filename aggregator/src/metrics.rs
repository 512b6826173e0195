//! Prometheus metrics and the tiny HTTP listener that serves them on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// An MQTT subscription filter of the embedded broker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilterLabel {
    pub filter: String,
}

/// Every metric the aggregator exports.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub rounds_completed: Counter,
    pub current_round: Gauge,
    pub updates_accepted: Counter,
    pub updates_rejected: Family<ReasonLabel, Counter>,
    /// Accepted updates left out of a round's aggregate at close.
    pub updates_excluded: Family<ReasonLabel, Counter>,
    pub update_bytes: Counter,
    /// Update bytes written to the spool and read back from it: the data path's disk traffic.
    pub update_bytes_spooled: Counter,
    pub update_bytes_read_back: Counter,
    pub model_bytes_published: Counter,
    pub connected_clients: Gauge,
    pub round_duration_seconds: Histogram,
    pub server_eval_failures: Counter,
    pub chunks_requested: Counter,
    pub chunks_refused: Family<ReasonLabel, Counter>,
    pub chunks_shed: Counter,
    pub chunk_bytes_shed: Counter,
    pub statuses_refused: Family<ReasonLabel, Counter>,
    pub retained_restored: Counter,
    /// Embedded broker: CONNECTs refused by the login check, by reason.
    pub broker_connects_refused: Family<ReasonLabel, Counter>,
    /// Embedded broker's mutual-TLS front: clients refused in the TLS handshake.
    pub tls_clients_refused: Counter,
    /// Embedded broker: times a subscriber fell more than `[broker] backlog_bytes` behind and
    /// rumqttd skipped it ahead, dropping what it had not read yet, by subscription filter.
    pub broker_backlog_overruns: Family<FilterLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("zk0_aggregator");
        let m = Metrics {
            rounds_completed: Counter::default(),
            current_round: Gauge::default(),
            updates_accepted: Counter::default(),
            updates_rejected: Family::default(),
            updates_excluded: Family::default(),
            update_bytes: Counter::default(),
            update_bytes_spooled: Counter::default(),
            update_bytes_read_back: Counter::default(),
            model_bytes_published: Counter::default(),
            connected_clients: Gauge::default(),
            round_duration_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            server_eval_failures: Counter::default(),
            chunks_requested: Counter::default(),
            chunks_refused: Family::default(),
            chunks_shed: Counter::default(),
            chunk_bytes_shed: Counter::default(),
            statuses_refused: Family::default(),
            retained_restored: Counter::default(),
            broker_connects_refused: Family::default(),
            tls_clients_refused: Counter::default(),
            broker_backlog_overruns: Family::default(),
            registry: Registry::default(),
        };
        // (name, help, metric): each exported as zk0_aggregator_<name>.
        macro_rules! register {
            ($($name:literal, $help:literal, $field:ident;)*) => {
                $(registry.register($name, $help, m.$field.clone());)*
            };
        }
        register! {
            "server_eval_failures", "Server evaluations that failed or timed out", server_eval_failures;
            "update_chunks_requested", "Update chunks lost on the way and asked for again", chunks_requested;
            "update_chunks_refused", "Update chunks dropped unstored (closed round, unenrolled, rejected upload, …), by reason", chunks_refused;
            "update_chunks_shed", "Update chunks dropped because the event loop's bounded inbox was full", chunks_shed;
            "update_chunk_bytes_shed", "Payload bytes of the update chunks shed", chunk_bytes_shed;
            "client_statuses_refused", "Client status messages dropped (unsigned or forged, unknown client, replayed), by reason", statuses_refused;
            "retained_restored", "The aggregator's retained announcement or status, overwritten by another publisher and published again", retained_restored;
            "broker_connects_refused", "CONNECTs the embedded broker refused (unknown login, wrong password, another login's client id), by reason", broker_connects_refused;
            "broker_backlog_overruns", "Times the embedded broker dropped messages a subscriber had not read yet (it fell more than backlog_bytes behind), by filter", broker_backlog_overruns;
            "tls_clients_refused", "Clients the embedded broker's mutual-TLS front refused in the handshake", tls_clients_refused;
            "rounds_completed", "Rounds aggregated and published", rounds_completed;
            "current_round", "Round number in progress", current_round;
            "updates_accepted", "Client updates verified and accepted", updates_accepted;
            "updates_rejected", "Client updates rejected, by reason", updates_rejected;
            "updates_excluded", "Accepted updates left out of the round's aggregate (norm outlier, non-finite aggregate), by reason", updates_excluded;
            "update_bytes", "Encoded update bytes received in chunks", update_bytes;
            "update_bytes_spooled", "Update bytes written to the spool: each stored chunk once, in place in its upload's file", update_bytes_spooled;
            "update_bytes_read_back", "Update bytes read back from the spool: each blob once to verify it on receipt, once more when the round folds it", update_bytes_read_back;
            "model_bytes_published", "Global model bytes published", model_bytes_published;
            "connected_clients", "Enrolled clients currently online", connected_clients;
            "round_duration_seconds", "Wall time from announce to publish", round_duration_seconds;
        }
        // Every reason shows up at 0 from the start, so dashboards and alerts see the series.
        for r in shared_proto::RejectReason::ALL {
            let _ = m.updates_rejected.get_or_create(&ReasonLabel {
                reason: r.as_str().to_string(),
            });
        }
        for i in crate::intake::Ignored::ALL {
            let _ = m.chunks_refused.get_or_create(&ReasonLabel {
                reason: i.as_str().to_string(),
            });
        }
        for r in crate::aggregate::ExcludeReason::ALL {
            let _ = m.updates_excluded.get_or_create(&ReasonLabel {
                reason: r.as_str().to_string(),
            });
        }
        Arc::new(Metrics { registry, ..m })
    }

    pub fn status_refused(&self, why: &str) {
        self.statuses_refused
            .get_or_create(&ReasonLabel {
                reason: why.to_string(),
            })
            .inc();
    }

    pub fn exclude(&self, reason: &str) {
        self.updates_excluded
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn reject(&self, reason: &str) {
        self.updates_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn chunk_refused(&self, why: &str) {
        self.chunks_refused
            .get_or_create(&ReasonLabel {
                reason: why.to_string(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        // Encoding into a String cannot fail except on fmt errors, which String never returns.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

/// Serves `GET /metrics` (and 404 for anything else) until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read up to the end of the request head: a client may send it in several
            // segments, and answering on a partial one would close under its feet.
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout_at(deadline, sock.read(&mut buf[n..])).await {
                    Ok(Ok(0)) => break,
                    Ok(Ok(k)) => n += k,
                    _ => return,
                }
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = if path == "/metrics" {
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.render(),
                )
            } else {
                ("404 Not Found", "text/plain", "not found\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
