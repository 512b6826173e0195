//! `certs init`: a private CA and a broker certificate for the embedded broker's mqtts. (The
//! client side, a rustls transport pinned to that CA, is `zk0_daemon::tls`.)

use std::path::Path;

use anyhow::{Context, Result};
use zk0_daemon::{write_atomic, write_private, Durability::Durable};

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

    write_atomic(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), Durable)?;
    write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    write_atomic(&dir.join("server.pem"), cert.pem().as_bytes(), Durable)?;
    write_private(&dir.join("server.key"), key.serialize_pem().as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_init_writes_a_ca_the_client_config_accepts() {
        let d = tempfile::tempdir().unwrap();
        certs_init(d.path(), &[]).unwrap();
        zk0_daemon::tls::client_transport(&d.path().join("ca.pem")).unwrap();
        assert!(certs_init(d.path(), &[]).is_err(), "must not overwrite");
    }
}
