//! End-to-end: mqtts on the embedded broker with certificates from `zk0-aggregator certs init`.
//!
//! - The documented set-up (`certs init --san <public host>`, `listen = "0.0.0.0:<port>"`)
//!   runs a round; on the same broker plain MQTT, an agent trusting another CA and an agent
//!   dialling a name the certificate lacks are each refused with the TLS reason in their log.
//! - A broker certificate the aggregator cannot dial itself by (expired, or issued only for the
//!   public name) stops the aggregator at start with the reason; an agent refuses an expired
//!   certificate served by another broker (mosquitto).
//! - The shipped example configs (`systemd/*.example.toml`) run a round as written, with only
//!   paths, ports and the host substituted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rumqttc_ring::{Client, Event, MqttOptions, Packet};
use zk0_e2e::federation::{find_mosquitto, BrokerKind, Federation};
use zk0_e2e::{bin, free_port, run_ok, wait_for, workspace_root, ChildGuard};

fn certs_init(dir: &Path, sans: &[&str]) -> Result<()> {
    let mut cmd = Command::new(bin("zk0-aggregator"));
    cmd.args(["certs", "init", "--dir"]).arg(dir);
    for s in sans {
        cmd.args(["--san", s]);
    }
    run_ok(&mut cmd).map(drop)
}

fn log_of(fed: &Federation, name: &str) -> String {
    std::fs::read_to_string(fed.dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Waits until `name`'s log contains `needle`.
fn wait_log(fed: &Federation, name: &str, needle: &str) -> Result<()> {
    wait_for(
        Duration::from_secs(20),
        &format!("{needle:?} in {name}.log"),
        || log_of(fed, name).contains(needle).then_some(()),
    )
}

/// Plain MQTT against the TLS listener gets no CONNACK.
fn plain_mqtt_refused(port: u16) -> Result<()> {
    let (_c, mut conn) = Client::new(MqttOptions::new("zk0-test-plain", "127.0.0.1", port), 10);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if let Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) =
            conn.recv_timeout(Duration::from_millis(300))
        {
            anyhow::bail!("plain MQTT was accepted on the TLS listener");
        }
    }
    Ok(())
}

/// Starts robot-a and waits for the round: it alone is accepted, and none of `refused` (already
/// started) ever got through to the broker.
fn only_robot_a_takes_part(fed: &mut Federation, refused: &[&str]) -> Result<()> {
    fed.start_agent("robot-a", 1)?;
    fed.wait_aggregator_ok(Duration::from_secs(60))?;
    let state = fed.state()?;
    anyhow::ensure!(
        state["history"][0]["accepted"] == serde_json::json!(["robot-a"]),
        "round 1: {:?}",
        state["history"][0]
    );
    for bad in refused {
        anyhow::ensure!(
            !log_of(fed, bad).contains("connected to the broker"),
            "{bad} got through"
        );
    }
    Ok(())
}

/// A server certificate for `sans`, valid only between `from` and `until` (years), signed by
/// the CA that `certs init` wrote into `ca_dir` (its subject and key usages, its key).
fn server_cert_from(ca_dir: &Path, out: &Path, sans: &[&str], years: (i32, i32)) -> Result<()> {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key"))?)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "zk0 federation CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let mut p =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "zk0-aggregator");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = rcgen::date_time_ymd(years.0, 1, 1);
    p.not_after = rcgen::date_time_ymd(years.1, 1, 1);
    let key = rcgen::KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out)?;
    std::fs::copy(ca_dir.join("ca.pem"), out.join("ca.pem"))?;
    std::fs::write(out.join("server.pem"), cert.pem())?;
    std::fs::write(out.join("server.key"), key.serialize_pem())?;
    Ok(())
}

#[test]
fn documented_setup_runs_a_round_and_bad_certificates_and_plain_mqtt_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(
        tmp.path(),
        BrokerKind::Embedded,
        &[
            ("robot-a", 50, "int8"),
            ("robot-wrong-ca", 50, "int8"),
            ("robot-wrong-name", 50, "int8"),
        ],
    )?;
    let certs = tmp.path().join("certs");
    certs_init(&certs, &["example.org"])?;
    let other = tmp.path().join("other-ca");
    certs_init(&other, &[])?;
    fed.tls_dir = Some(certs);
    // The documented production set-up: every interface (H2: the aggregator still reaches
    // its own broker, by a loopback name the certificate keeps).
    fed.listen = Some(format!("0.0.0.0:{}", fed.port));
    fed.min_clients = Some(1);
    for c in ["robot-a", "robot-wrong-ca", "robot-wrong-name"] {
        fed.users.insert(c.into(), format!("pw-{c}"));
    }
    let set = |k: &str, v: String| [(k.to_string(), v)].into_iter().collect();
    fed.agent_set.insert(
        "robot-wrong-ca".into(),
        set("ca_file", format!("{:?}", other.join("ca.pem"))),
    );
    // 127.0.0.2 reaches the same listener (loopback is 127/8) under a name not in the cert.
    fed.agent_set.insert(
        "robot-wrong-name".into(),
        set("broker", format!("\"mqtts://127.0.0.2:{}\"", fed.port)),
    );
    let r = (|| -> Result<()> {
        fed.start_aggregator(1, 30.0, &[])?;
        plain_mqtt_refused(fed.port)?;
        fed.start_agent("robot-wrong-ca", 1)?;
        fed.start_agent("robot-wrong-name", 1)?;
        wait_log(
            &fed,
            "robot-wrong-ca",
            // Both CAs are "zk0 federation CA": the other one's signature does not verify.
            "invalid peer certificate: BadSignature",
        )?;
        wait_log(
            &fed,
            "robot-wrong-name",
            "certificate not valid for name \"127.0.0.2\"",
        )?;
        only_robot_a_takes_part(&mut fed, &["robot-wrong-ca", "robot-wrong-name"])
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}

#[test]
fn a_certificate_that_does_not_fit_is_refused_by_the_aggregator_and_the_agent() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(tmp.path(), BrokerKind::Embedded, &[("robot-a", 50, "int8")])?;
    fed.users.insert("robot-a".into(), "pw-robot-a".into());
    let ca = tmp.path().join("ca");
    certs_init(&ca, &[])?;
    let expired = tmp.path().join("expired");
    server_cert_from(&ca, &expired, &["localhost", "127.0.0.1"], (2020, 2021))?;
    let public_only = tmp.path().join("public-only");
    server_cert_from(&ca, &public_only, &["example.org"], (2020, 2100))?;
    let r = (|| -> Result<()> {
        // The aggregator refuses to serve what it (and so every agent) cannot verify.
        for (dir, why) in [
            (&expired, "invalid peer certificate: certificate expired"),
            (&public_only, "certificate not valid for name \"127.0.0.1\""),
        ] {
            fed.tls_dir = Some(dir.clone());
            let e = fed
                .start_aggregator(1, 30.0, &[])
                .expect_err("the aggregator served a certificate it cannot dial itself by");
            anyhow::ensure!(e.to_string().contains("exited"), "{e:#}");
            let log = log_of(&fed, "aggregator");
            anyhow::ensure!(
                log.contains("cannot reach its own broker over TLS") && log.contains(why),
                "no clear reason for {}: {log}",
                dir.display()
            );
            std::fs::remove_file(fed.dir.join("aggregator.log"))?;
        }
        // An agent refuses an expired certificate from a broker that serves one.
        let mosq = find_mosquitto().context("mosquitto is not installed")?;
        let mport = free_port()?;
        let conf = tmp.path().join("mosquitto-tls.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {mport} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 cafile {}\ncertfile {}\nkeyfile {}\n",
                expired.join("ca.pem").display(),
                expired.join("server.pem").display(),
                expired.join("server.key").display()
            ),
        )?;
        let mut cmd = Command::new(mosq);
        cmd.arg("-c").arg(&conf);
        let _broker = ChildGuard::spawn("mosquitto", cmd, &tmp.path().join("mosquitto.log"))?;
        wait_for(Duration::from_secs(10), "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", mport)).ok()
        })?;
        fed.tls_dir = Some(expired.clone());
        fed.agent_set.insert(
            "robot-a".into(),
            [(
                "broker".to_string(),
                format!("\"mqtts://127.0.0.1:{mport}\""),
            )]
            .into(),
        );
        fed.start_agent("robot-a", 1)?;
        wait_log(
            &fed,
            "robot-a",
            "invalid peer certificate: certificate expired",
        )?;
        anyhow::ensure!(!log_of(&fed, "robot-a").contains("connected to the broker"));
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}

/// `text` with every `(from, to)` replaced; each `from` must occur (so the test notices when
/// the example changes under it).
fn substitute(text: &str, subs: &[(&str, String)]) -> Result<String> {
    let mut t = text.to_string();
    for (from, to) in subs {
        anyhow::ensure!(t.contains(from), "the example no longer contains {from:?}");
        t = t.replace(from, to);
    }
    Ok(t)
}

#[test]
fn the_shipped_example_configs_run_a_round_as_written() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let worker = env!("CARGO_BIN_EXE_zk0-fake-worker");
    let robots = ["so101-lab-1", "so101-lab-2"];
    let fed = Federation::setup(
        tmp.path(),
        BrokerKind::Embedded,
        worker.as_ref(),
        &[(robots[0], 40, "int8"), (robots[1], 60, "int8")],
    )?;
    // As the example's comment says, with the public host name of this "VM".
    let tls = tmp.path().join("tls");
    certs_init(&tls, &["aggregator.example.org"])?;
    let examples = workspace_root().join("systemd");
    let agg_toml = substitute(
        &std::fs::read_to_string(examples.join("aggregator.example.toml"))?,
        &[
            ("/etc/zk0/tls", tls.display().to_string()),
            (
                "/var/lib/zk0-aggregator",
                fed.state_dir.display().to_string(),
            ),
            ("0.0.0.0:8883", format!("0.0.0.0:{}", fed.port)),
            ("127.0.0.1:9464", format!("127.0.0.1:{}", free_port()?)),
        ],
    )?;
    let agg_path = tmp.path().join("aggregator.toml");
    std::fs::write(&agg_path, agg_toml)?;
    let mut cmd = Command::new(bin("zk0-aggregator"));
    cmd.arg("--config")
        .arg(&agg_path)
        .args(["serve", "--rounds", "1", "--exit-when-done"]);
    let mut agg = ChildGuard::spawn("zk0-aggregator", cmd, &tmp.path().join("aggregator.log"))?;
    let port = fed.port;
    let r = (|| -> Result<()> {
        wait_for(Duration::from_secs(20), "the broker port", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })?;
        let agent_example = std::fs::read_to_string(examples.join("agent.example.toml"))?;
        let mut agents = Vec::new();
        for (robot, password) in robots.iter().zip(["change-me", "change-me-too"]) {
            let cdir: PathBuf = tmp.path().join(robot);
            std::fs::create_dir_all(cdir.join("smolvla_base"))?;
            let mut subs = vec![
                ("aggregator.example.org:8883", format!("localhost:{port}")),
                ("/etc/zk0/ca.pem", tls.join("ca.pem").display().to_string()),
                (
                    "/etc/zk0/aggregator.pub",
                    fed.state_dir.join("aggregator.pub").display().to_string(),
                ),
                (
                    "/var/lib/zk0-agent/agent.key",
                    cdir.join("agent.key").display().to_string(),
                ),
                (
                    "/var/lib/zk0-agent/datasets/pick-place",
                    cdir.join(format!("ds-{robot}")).display().to_string(),
                ),
                (
                    "/var/cache/zk0-agent",
                    cdir.join("cache").display().to_string(),
                ),
                (
                    "/var/lib/zk0-agent/work",
                    cdir.join("work").display().to_string(),
                ),
                (
                    "/var/lib/zk0-agent/smolvla_base",
                    cdir.join("smolvla_base").display().to_string(),
                ),
                ("/usr/bin/zk0-train", worker.to_string()),
            ];
            if *robot != "so101-lab-1" {
                subs.push(("\"so101-lab-1\"", format!("{robot:?}")));
                subs.push(("\"change-me\"", format!("{password:?}")));
            }
            let cfg = cdir.join("agent.toml");
            std::fs::write(&cfg, substitute(&agent_example, &subs)?)?;
            let mut cmd = Command::new(bin("zk0-agent"));
            cmd.arg("run")
                .arg("--config")
                .arg(&cfg)
                .args(["--max-rounds", "1"]);
            agents.push(ChildGuard::spawn(
                robot,
                cmd,
                &tmp.path().join(format!("{robot}.log")),
            )?);
        }
        let st = agg.wait_timeout(Duration::from_secs(90))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        anyhow::ensure!(
            state["history"][0]["accepted"] == serde_json::json!(robots),
            "round 1: {:?}",
            state["history"][0]
        );
        for a in &mut agents {
            let st = a.wait_timeout(Duration::from_secs(20))?;
            anyhow::ensure!(st.success(), "agent {} exited with {st}", a.name);
        }
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}

#[test]
fn mosquitto_with_mutual_tls_admits_an_issued_client_certificate_and_refuses_others() -> Result<()>
{
    mutual_tls_round(BrokerKind::Mosquitto)
}

#[test]
fn the_embedded_broker_with_mutual_tls_admits_an_issued_certificate_and_refuses_others(
) -> Result<()> {
    mutual_tls_round(BrokerKind::Embedded)
}

/// One round over mutual TLS (`kind`'s broker requiring client certificates from the certs-init
/// CA): robot-a with a certificate from `certs issue` takes part; robot-no-cert (none) and
/// robot-other-ca (issued by another CA) are refused by the broker's TLS.
fn mutual_tls_round(kind: BrokerKind) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::fake(
        tmp.path(),
        kind,
        &[
            ("robot-a", 50, "int8"),
            ("robot-no-cert", 50, "int8"),
            ("robot-other-ca", 50, "int8"),
        ],
    )?;
    let certs = tmp.path().join("certs");
    certs_init(&certs, &[])?;
    let other = tmp.path().join("other-ca");
    certs_init(&other, &[])?;
    let issue = |dir: &Path, id: &str| {
        run_ok(
            Command::new(bin("zk0-aggregator"))
                .args(["certs", "issue", id, "--dir"])
                .arg(dir),
        )
    };
    issue(&certs, "robot-a")?;
    issue(&certs, "zk0-aggregator")?;
    issue(&other, "robot-other-ca")?;
    // mosquitto serving the certs-init certificate and requiring a client certificate from
    // the same CA (`user root`: run as root it would drop to a user that cannot read the
    // owner-only key; as anyone else it has no effect).
    fed.mosquitto_conf = Some(format!(
        "user root\nallow_anonymous true\nrequire_certificate true\ncafile {}\ncertfile {}\nkeyfile {}\n",
        certs.join("ca.pem").display(),
        certs.join("server.pem").display(),
        certs.join("server.key").display()
    ));
    fed.tls_dir = Some(certs.clone());
    match kind {
        // The aggregator's own client presents its issued certificate to mosquitto.
        BrokerKind::Mosquitto => {
            fed.broker_login = Some(("zk0-aggregator".into(), "unused".into()));
            fed.broker_toml = format!(
                "tls_client_cert = {:?}\ntls_client_key = {:?}\n",
                certs.join("zk0-aggregator.pem"),
                certs.join("zk0-aggregator.key")
            );
        }
        BrokerKind::Embedded => {
            fed.broker_toml = "require_client_cert = true\n".into();
            fed.metrics_listen = format!("127.0.0.1:{}", free_port()?);
            for c in ["robot-a", "robot-no-cert", "robot-other-ca"] {
                fed.users.insert(c.into(), format!("pw-{c}"));
            }
        }
    }
    fed.min_clients = Some(1);
    let identity = |dir: &Path, id: &str| -> BTreeMap<String, String> {
        [
            (
                "cert_file".to_string(),
                format!("{:?}", dir.join(format!("{id}.pem"))),
            ),
            (
                "cert_key_file".to_string(),
                format!("{:?}", dir.join(format!("{id}.key"))),
            ),
        ]
        .into()
    };
    fed.agent_set
        .insert("robot-a".into(), identity(&certs, "robot-a"));
    fed.agent_set
        .insert("robot-other-ca".into(), identity(&other, "robot-other-ca"));
    anyhow::ensure!(fed.start_broker()?, "mosquitto is not installed");
    let r = (|| -> Result<()> {
        fed.start_aggregator(1, 30.0, &[])?;
        fed.start_agent("robot-no-cert", 1)?;
        fed.start_agent("robot-other-ca", 1)?;
        wait_log(
            &fed,
            "robot-no-cert",
            "received fatal alert: CertificateRequired",
        )?;
        // The other CA has the same name: its signature on the client certificate fails.
        wait_log(&fed, "robot-other-ca", "received fatal alert: DecryptError")?;
        if kind == BrokerKind::Embedded {
            let m = zk0_e2e::http_get(&fed.metrics_listen, "/metrics")?;
            let refused: u64 = m
                .lines()
                .find_map(|l| l.strip_prefix("zk0_aggregator_tls_clients_refused_total "))
                .and_then(|v| v.trim().parse().ok())
                .context("no tls_clients_refused metric")?;
            anyhow::ensure!(refused >= 2, "{refused} TLS clients refused, expected both");
        }
        only_robot_a_takes_part(&mut fed, &["robot-no-cert", "robot-other-ca"])
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
