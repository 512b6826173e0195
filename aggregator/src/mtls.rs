//! Mutual TLS for the embedded broker (`broker.require_client_cert`): a TLS front on the public
//! listen address that admits only clients presenting a certificate from `broker.tls_ca`
//! (`zk0-aggregator certs issue`), and relays each admitted connection's bytes to rumqttd on a
//! loopback port.
//!
//! rumqttd 0.20 can require client certificates only with its compile-time
//! `verify-client-cert` feature, which then demands them on every TLS listener and turns a
//! certificate's organisation into a tenant prefix of its topics; the front keeps it optional
//! and leaves the broker as it is. Logins are still checked by the broker behind it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::metrics::Metrics;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves mutual TLS on `listener` (already bound), relaying to `upstream`, on a thread of its
/// own for the life of the process.
pub fn spawn_front(
    listener: std::net::TcpListener,
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    upstream: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let config = zk0_daemon::tls::server_config_requiring_client_certs(cert, key, client_ca)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the mutual-TLS front's runtime")?;
    std::thread::Builder::new()
        .name("mtls-front".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "mutual-TLS front stopped"),
                };
                loop {
                    match listener.accept().await {
                        Ok((tcp, peer)) => {
                            let m = metrics.clone();
                            tokio::spawn(relay(acceptor.clone(), tcp, peer, upstream, m));
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "mutual-TLS front: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })
        .context("spawning the mutual-TLS front")?;
    Ok(())
}

async fn relay(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    metrics: Arc<Metrics>,
) {
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics.tls_clients_refused.inc();
            return tracing::warn!(%peer, error = %e, "refused a TLS client");
        }
        Err(_) => {
            metrics.tls_clients_refused.inc();
            return tracing::warn!(%peer, "TLS handshake timed out");
        }
    };
    let mut broker = match tokio::net::TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "mutual-TLS front cannot reach the broker"),
    };
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
}
