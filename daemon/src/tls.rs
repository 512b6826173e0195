//! The mqtts transport: rustls with the ring provider, trusting only a pinned CA file; and the
//! same check applied ahead of time to a broker certificate ([`check_server_cert`]), so a daemon
//! can refuse a certificate its clients would refuse, with the reason, before serving it.

use std::path::Path;
use std::sync::Arc;

use rumqttc_ring::{TlsConfiguration, Transport};
use rustls_ring::pki_types::pem::PemObject;
use rustls_ring::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::Error;

fn tls_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |why| Error::Tls {
        path: path.to_owned(),
        why,
    }
}

/// The certificates of a PEM file, at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bad = tls_err(path);
    let pem = std::fs::read(path).map_err(Error::io(path))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("parsing: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(certs)
}

fn roots(ca_pem: &Path) -> Result<rustls_ring::RootCertStore, Error> {
    let mut roots = rustls_ring::RootCertStore::empty();
    for cert in read_certs(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| tls_err(ca_pem)(format!("adding a CA: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls_ring::crypto::CryptoProvider> {
    Arc::new(rustls_ring::crypto::ring::default_provider())
}

/// Checks now, as a client dialling `name` and trusting only `ca_pem` would, that the
/// certificate chain in `cert_pem` is valid: signed by that CA, unexpired, and issued for
/// `name` (a DNS name or an IP address). The error says which of these failed.
pub fn check_server_cert(ca_pem: &Path, cert_pem: &Path, name: &str) -> Result<(), Error> {
    use rustls_ring::client::danger::ServerCertVerifier;
    let bad = tls_err(cert_pem);
    let verifier = rustls_ring::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider(),
    )
    .build()
    .map_err(|e| tls_err(ca_pem)(e.to_string()))?;
    let chain = read_certs(cert_pem)?;
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|e| bad(format!("{name:?} is not a host name: {e}")))?;
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &server_name, &[], UnixTime::now())
        .map_err(|e| bad(format!("not valid for a client dialling {name}: {e}")))?;
    Ok(())
}

/// A TLS server config serving `cert_pem`/`key_pem` that admits only clients presenting a
/// certificate chaining to `client_ca_pem` (mutual TLS).
pub fn server_config_requiring_client_certs(
    cert_pem: &Path,
    key_pem: &Path,
    client_ca_pem: &Path,
) -> Result<rustls_ring::ServerConfig, Error> {
    let verifier = rustls_ring::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(client_ca_pem)?),
        provider(),
    )
    .build()
    .map_err(|e| tls_err(client_ca_pem)(e.to_string()))?;
    rustls_ring::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert_pem)(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(cert_pem)?, read_key(key_pem)?)
        .map_err(|e| tls_err(cert_pem)(format!("certificate and key: {e}")))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = std::fs::read(path).map_err(Error::io(path))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| tls_err(path)(format!("reading the private key: {e}")))
}

/// An mqtts transport that trusts only the CA certificates in `ca_pem`.
pub fn client_transport(ca_pem: &Path) -> Result<Transport, Error> {
    client_transport_with(ca_pem, None)
}

/// [`client_transport`], presenting the client certificate chain and key of `identity`
/// (`(cert_pem, key_pem)`, e.g. from `zk0-aggregator certs issue`) to a broker that asks.
pub fn client_transport_with(
    ca_pem: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Transport, Error> {
    let bad = tls_err(ca_pem);
    let roots = roots(ca_pem)?;
    let builder = rustls_ring::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| tls_err(cert)(format!("client certificate and key: {e}")))?,
    };
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_file_without_certificates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        assert!(matches!(client_transport(&p), Err(Error::Tls { .. })));
        assert!(matches!(
            client_transport(&d.path().join("missing.pem")),
            Err(Error::Io { .. })
        ));
    }
}
