//! `acl --mosquitto DIR`: the broker-side half of per-robot identity for a mosquitto broker.
//!
//! Writes, from the aggregator config:
//!
//! - `passwd`: mosquitto's own password file (`user:$7$<iterations>$<salt>$<hash>`,
//!   PBKDF2-HMAC-SHA512, the format `mosquitto_passwd` writes) with every `[broker.users]`
//!   login and the aggregator's `broker.username`;
//! - `acl`: the aggregator's login may use every topic of the federation; every other login
//!   (`%u`, which is its zk0 client id) may publish only its own status and updates and read
//!   the server's topics and its own acks;
//! - `zk0.conf`: `password_file`, `acl_file`, `allow_anonymous false` and
//!   `use_username_as_clientid true`, which binds a login to one MQTT client id (its username),
//!   so one robot's login cannot take over another's session either. Paste it into the
//!   listener's section of mosquitto.conf (`use_username_as_clientid` is a per-listener
//!   setting; before any `listener` line mosquitto opens a default one on port 1883 for it).
//!   The files are owner-only: `chown mosquitto` them.
//!
//! What the broker cannot check (the content of a message a robot may publish) the protocol's
//! signatures cover.

use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use rand::RngCore;
use shared_proto::topic::Topics;

use crate::config::Config;

/// mosquitto_passwd's defaults (mosquitto 2.0): 101 rounds, a 12-byte salt.
const ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;

/// One password-file line, `user:$7$…`, with `salt`.
pub fn password_line(user: &str, password: &str, salt: &[u8]) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2::<hmac::Hmac<sha2::Sha512>>(password.as_bytes(), salt, ITERATIONS, &mut hash);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "{user}:$7${ITERATIONS}${}${}",
        b64.encode(salt),
        b64.encode(hash)
    )
}

/// The ACL file for federation `topics`, the aggregator logging in as `aggregator`.
pub fn acl_file(topics: &Topics, aggregator: &str) -> String {
    let p = topics.prefix();
    format!(
        "# zk0 federation {fed}: written by `zk0-aggregator acl --mosquitto`.\n\
         # The aggregator: every topic of the federation.\n\
         user {aggregator}\n\
         topic readwrite {p}/#\n\
         \n\
         # Every login is a zk0 client id (%u; the client id too, by use_username_as_clientid):\n\
         # it publishes its own status and updates, reads the server's topics and its own acks.\n\
         # (mosquitto warns that the shared read patterns have no %u: they are meant for all.)\n\
         pattern write {p}/client/%u/status\n\
         pattern write {p}/client/%u/update/#\n\
         pattern read {p}/client/%u/ack/#\n\
         pattern read {p}/server/status\n\
         pattern read {p}/round\n\
         pattern read {p}/model/#\n",
        fed = topics.federation(),
    )
}

/// Writes `passwd`, `acl` and `zk0.conf` into `dir` (created; files replaced, owner-only).
pub fn write_mosquitto(cfg: &Config, dir: &Path) -> Result<()> {
    let b = &cfg.broker;
    anyhow::ensure!(
        !b.username.is_empty(),
        "broker.username (the aggregator's login on the broker) is not set"
    );
    anyhow::ensure!(
        !b.users.is_empty(),
        "[broker.users] is empty: no client logins to write"
    );
    let topics = Topics::new(&cfg.federation).context("federation name")?;
    let mut passwd = String::new();
    for (user, password) in b.users.iter().chain([(&b.username, &b.password)]) {
        shared_proto::topic::validate_client_id(user)
            .with_context(|| format!("login {user:?} (logins are client ids)"))?;
        let mut salt = [0u8; SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        passwd.push_str(&password_line(user, password, &salt));
        passwd.push('\n');
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let conf = format!(
        "# zk0 federation {fed}: paste into mosquitto.conf, after the `listener` line.\n\
         password_file {passwd}\n\
         acl_file {acl}\n\
         allow_anonymous false\n\
         # One MQTT client id per login: a robot's login cannot take over another's session.\n\
         use_username_as_clientid true\n",
        fed = cfg.federation,
        passwd = dir.join("passwd").display(),
        acl = dir.join("acl").display(),
    );
    zk0_daemon::write_private(&dir.join("passwd"), passwd.as_bytes())?;
    zk0_daemon::write_private(&dir.join("acl"), acl_file(&topics, &b.username).as_bytes())?;
    zk0_daemon::write_private(&dir.join("zk0.conf"), conf.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_lines_match_mosquitto_passwd() {
        // Written by mosquitto_passwd 2.0.11: `mosquitto_passwd -c -b pw.txt robot-a pw-robot-a`.
        let reference = "robot-a:$7$101$mtgmOIrfT/TxwCVN$Qg2S65GkVqoe3O9HHJLzaQ285C2+rhuBs7k6\
                         LPcmQmOgS0BHbdzDX/J8fN9m7BIcW9BQoBxKkMSNPUd1l/cqbA==";
        let salt = base64::engine::general_purpose::STANDARD
            .decode("mtgmOIrfT/TxwCVN")
            .unwrap();
        assert_eq!(password_line("robot-a", "pw-robot-a", &salt), reference);
        assert_ne!(password_line("robot-a", "pw-robot-b", &salt), reference);
    }

    #[test]
    fn writes_every_login_and_refuses_without_the_aggregators() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            federation: "fed".into(),
            ..Default::default()
        };
        cfg.broker.users.insert("robot-a".into(), "a".into());
        cfg.broker.users.insert("robot-b".into(), "b".into());
        assert!(
            write_mosquitto(&cfg, d.path()).is_err(),
            "no aggregator login"
        );
        cfg.broker.username = "zk0-aggregator".into();
        cfg.broker.password = "agg".into();
        write_mosquitto(&cfg, d.path()).unwrap();
        let passwd = std::fs::read_to_string(d.path().join("passwd")).unwrap();
        let users: Vec<&str> = passwd.lines().filter_map(|l| l.split(':').next()).collect();
        assert_eq!(users, ["robot-a", "robot-b", "zk0-aggregator"]);
        let acl = std::fs::read_to_string(d.path().join("acl")).unwrap();
        assert!(acl.contains("user zk0-aggregator\ntopic readwrite zk0/v1/fed/#\n"));
        assert!(acl.contains("pattern write zk0/v1/fed/client/%u/update/#\n"));
        let conf = std::fs::read_to_string(d.path().join("zk0.conf")).unwrap();
        assert!(
            conf.contains("allow_anonymous false")
                && conf.contains("use_username_as_clientid true")
        );
    }
}
