//! The mqtts transport: rustls with the ring provider, trusting only a pinned CA file.

use std::path::Path;
use std::sync::Arc;

use rumqttc_ring::{TlsConfiguration, Transport};
use rustls_ring::pki_types::pem::PemObject;
use rustls_ring::pki_types::CertificateDer;

use crate::Error;

/// An mqtts transport that trusts only the CA certificates in `ca_pem`.
pub fn client_transport(ca_pem: &Path) -> Result<Transport, Error> {
    let bad = |why: String| Error::Tls {
        path: ca_pem.to_owned(),
        why,
    };
    let pem = std::fs::read(ca_pem).map_err(Error::io(ca_pem))?;
    let mut roots = rustls_ring::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("parsing: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("adding a CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let provider = Arc::new(rustls_ring::crypto::ring::default_provider());
    let config = rustls_ring::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
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
