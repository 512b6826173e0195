//! `certs init`: a private CA and a broker certificate for the embedded broker's mqtts;
//! `certs issue`: client certificates from that CA for mutual TLS. (The client side, a rustls
//! transport pinned to that CA, is `zk0_daemon::tls`.)

use std::path::Path;

use anyhow::{Context, Result};
use zk0_daemon::{write_atomic, write_private, Durability::Durable};

/// The names the aggregator dials its own embedded broker by (see `broker::self_connect_host`):
/// every broker certificate from [`certs_init`] carries them, whatever else it is issued for.
pub const LOOPBACK_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

/// Writes `ca.pem`, `ca.key`, `server.pem`, `server.key` into `dir`: a private CA and a broker
/// certificate for [`LOOPBACK_NAMES`] plus `sans` (DNS names or IP addresses). Keys are created
/// owner-only. Refuses to overwrite.
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
    let ca_params = ca_params()?;
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);

    let mut names: Vec<String> = LOOPBACK_NAMES.iter().map(|s| s.to_string()).collect();
    for s in sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(names)?;
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

/// The CA's subject and usages: what `certs init` self-signs, and what `certs issue` names as
/// the issuer again (with `ca.key`) so its certificates chain to `ca.pem`.
fn ca_params() -> Result<rcgen::CertificateParams> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "zk0 federation CA");
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    Ok(p)
}

/// `certs issue <client-id>`: a client certificate (common name = the client id, client-auth
/// usage) signed by the CA in `dir`, written as `<client-id>.pem` and `<client-id>.key` (0600)
/// there, for an agent (`cert_file`, `cert_key_file`) or the aggregator
/// (`broker.tls_client_cert`/`tls_client_key`) on a broker that requires mutual TLS. Refuses
/// to overwrite.
pub fn certs_issue(dir: &Path, client_id: &str) -> Result<()> {
    shared_proto::topic::validate_client_id(client_id)?;
    let (pem, key_path) = (
        dir.join(format!("{client_id}.pem")),
        dir.join(format!("{client_id}.key")),
    );
    for f in [&pem, &key_path] {
        anyhow::ensure!(!f.exists(), "{} exists; refusing to overwrite", f.display());
    }
    let ca_key_path = dir.join("ca.key");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path).with_context(|| {
            format!("reading {} (run `certs init` first)", ca_key_path.display())
        })?)
        .with_context(|| format!("{} is not a private key", ca_key_path.display()))?;
    let issuer = rcgen::Issuer::new(ca_params()?, &ca_key);
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, client_id);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_atomic(&pem, cert.pem().as_bytes(), Durable)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_init_writes_a_ca_the_client_config_accepts() {
        let d = tempfile::tempdir().unwrap();
        certs_init(d.path(), &["example.org".into()]).unwrap();
        let (ca, cert) = (d.path().join("ca.pem"), d.path().join("server.pem"));
        zk0_daemon::tls::client_transport(&ca).unwrap();
        // `--san` adds names; the loopback names the aggregator dials itself by stay.
        for name in ["example.org", "127.0.0.1", "localhost"] {
            zk0_daemon::tls::check_server_cert(&ca, &cert, name).unwrap();
        }
        let e = zk0_daemon::tls::check_server_cert(&ca, &cert, "example.com").unwrap_err();
        assert!(e.to_string().contains("example.com"), "{e}");
        #[cfg(unix)]
        for key in ["ca.key", "server.key"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        assert!(certs_init(d.path(), &[]).is_err(), "must not overwrite");
        certs_issue(d.path(), "robot-a").unwrap();
        zk0_daemon::tls::client_transport_with(
            &ca,
            Some((&d.path().join("robot-a.pem"), &d.path().join("robot-a.key"))),
        )
        .unwrap();
        assert!(
            certs_issue(d.path(), "robot-a").is_err(),
            "must not overwrite"
        );
        assert!(certs_issue(d.path(), "../x").is_err(), "not a client id");
    }
}
