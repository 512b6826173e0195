//! TLS for MQTT: the client-side rustls config (ring provider, a pinned CA) and `certs init`,
//! which makes a private CA and a broker certificate for the embedded broker.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rumqttc_ring::{TlsConfiguration, Transport};
use rustls_ring::pki_types::pem::PemObject;
use rustls_ring::pki_types::CertificateDer;

/// An mqtts transport that trusts only the CA certificates in `ca_pem`.
pub fn client_transport(ca_pem: &Path) -> Result<Transport> {
    let pem = std::fs::read(ca_pem)
        .with_context(|| format!("reading CA certificate {}", ca_pem.display()))?;
    let mut roots = rustls_ring::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("parsing {}", ca_pem.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("adding a CA from {}", ca_pem.display()))?;
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
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )))
}

/// Writes `ca.pem`, `ca.key`, `server.pem`, `server.key` into `dir`: a private CA and a broker
/// certificate for `sans` (DNS names or IP addresses). Refuses to overwrite.
pub fn certs_init(dir: &Path, sans: &[String]) -> Result<()> {
    let files = ["ca.pem", "ca.key", "server.pem", "server.key"];
    for f in files {
        anyhow::ensure!(
            !dir.join(f).exists(),
            "{} exists; refusing to overwrite",
            dir.join(f).display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "zk0 federation CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);

    let mut sans = sans.to_vec();
    if sans.is_empty() {
        sans = vec!["localhost".into(), "127.0.0.1".into()];
    }
    let mut params = rcgen::CertificateParams::new(sans)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "zk0-aggregator");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    crate::store::write_atomic(&dir.join("ca.pem"), ca_cert.pem().as_bytes())?;
    crate::store::write_atomic(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    crate::store::write_atomic(&dir.join("server.pem"), cert.pem().as_bytes())?;
    crate::store::write_atomic(&dir.join("server.key"), key.serialize_pem().as_bytes())?;
    restrict(&dir.join("ca.key"))?;
    restrict(&dir.join("server.key"))?;
    Ok(())
}

#[cfg(unix)]
fn restrict(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

#[cfg(not(unix))]
fn restrict(_: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_init_writes_a_ca_the_client_config_accepts() {
        let d = tempfile::tempdir().unwrap();
        certs_init(d.path(), &[]).unwrap();
        client_transport(&d.path().join("ca.pem")).unwrap();
        assert!(certs_init(d.path(), &[]).is_err(), "must not overwrite");
    }
}
