//! `zk0-agent start | status | stop` with real processes: the agent runs detached (pidfile,
//! log and status file in its work dir) against a minimal MQTT broker in this test, which
//! accepts the connection and publishes a round announcement; `status` reports it connected
//! and on that round; a second start is refused; a stale pidfile is handled; `--dataset`
//! takes a repo id from the local LeRobot cache.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use shared_proto::message::{self, HyperParams, RoundAnnouncement, PROTOCOL_VERSION};
use shared_proto::sign::KeyPair;
use shared_proto::topic::Topics;

fn agent(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zk0-agent"));
    c.args(args).env_remove("ZK0_AGENT_CONFIG");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("running zk0-agent")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Reads one MQTT packet (fixed header, variable-length remaining length, body).
fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let kind = b[0];
    let (mut len, mut shift) = (0usize, 0);
    loop {
        s.read_exact(&mut b)?;
        len |= ((b[0] & 0x7f) as usize) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 || shift > 21 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((kind, body))
}

fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    let mut p = vec![0x30];
    let mut n = body.len();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        p.push(byte);
        if n == 0 {
            break;
        }
    }
    p.extend(body);
    p
}

/// Accepts MQTT clients: CONNACK, then the round announcement; everything else is read and
/// dropped (enough for the agent to count as connected and to learn the round).
fn fake_broker(listener: TcpListener, round_topic: String, ann: Vec<u8>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            let (topic, ann) = (round_topic.clone(), ann.clone());
            std::thread::spawn(move || {
                let Ok((kind, _)) = read_packet(&mut s) else {
                    return;
                };
                assert_eq!(kind >> 4, 1, "first packet must be CONNECT");
                s.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
                s.write_all(&publish_packet(&topic, &ann)).unwrap();
                while read_packet(&mut s).is_ok() {}
            });
        }
    });
}

fn wait_status(
    cfg: &Path,
    envs: &[(&str, &Path)],
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let o = agent(
            &["status", "--json", "--config", cfg.to_str().unwrap()],
            envs,
        );
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if want(&v) {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "status never matched: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn start_status_stop_with_a_broker_and_a_cached_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for k in ["agent.key", "aggregator.key"] {
        let o = agent(&["keys", "init", "--key", d.join(k).to_str().unwrap()], &[]);
        assert!(o.status.success(), "{}", text(&o));
    }
    // A dataset in the LeRobot cache, named by repo id.
    let cache = d.join("lerobot");
    std::fs::create_dir_all(cache.join("someone/so101_pick")).unwrap();
    let envs = [("HF_LEROBOT_HOME", cache.as_path())];

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let aggregator =
        KeyPair::from_pem(&std::fs::read_to_string(d.join("aggregator.key")).unwrap()).unwrap();
    let ann = RoundAnnouncement {
        v: PROTOCOL_VERSION,
        federation: "fleet".into(),
        seq: 1,
        round: 7,
        model_id: "ab".repeat(32).into(),
        base_model: "lerobot/smolvla_base".into(),
        hyper: HyperParams {
            local_steps: 1,
            lr: 1e-4,
            mu: 0.01,
            batch_size: 2,
            lr_overrides: BTreeMap::new(),
        },
        deadline_unix_ms: 0, // already past: the agent records the round but does not train
        min_clients: 1,
        selected: vec![],
        accepted_codecs: vec!["int8".into()],
        chunk_size: 1 << 20,
        max_update_bytes: 1 << 20,
        signature: Vec::new(),
    }
    .signed(&aggregator);
    fake_broker(
        listener,
        Topics::new("fleet").unwrap().round(),
        message::encode(&ann),
    );

    let work = d.join("work");
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "client_id = \"robot-1\"\nfederation = \"fleet\"\nbroker = \"mqtt://127.0.0.1:{port}\"\n\
             insecure = true\nkey_file = {:?}\naggregator_key = {:?}\nwork_dir = {:?}\ncache_dir = {:?}\n",
            d.join("agent.key"),
            d.join("aggregator.key.pub"),
            work,
            d.join("cache"),
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();

    let o = agent(
        &["start", "--config", c, "--dataset", "someone/so101_pick"],
        &envs,
    );
    assert!(o.status.success(), "{}", text(&o));
    let pid: u32 = std::fs::read_to_string(work.join("zk0-agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let v = wait_status(&cfg, &envs, |v| v["connected"] == true && v["round"] == 7);
    assert_eq!(v["running"], true);
    assert_eq!(v["pid"], pid);
    assert_eq!(v["client_id"], "robot-1");
    assert_eq!(
        v["dataset"].as_str().unwrap(),
        cache.join("someone/so101_pick").to_str().unwrap()
    );
    let o = agent(&["status", "--config", c], &envs);
    let t = text(&o);
    assert!(
        t.contains(&format!("running (pid {pid})")) && t.contains("connected:  yes"),
        "{t}"
    );
    assert!(t.contains("round:      7"), "{t}");

    let o = agent(&["start", "--config", c], &envs);
    assert!(
        !o.status.success() && text(&o).contains("already running"),
        "{}",
        text(&o)
    );

    let o = agent(&["stop", "--config", c], &envs);
    assert!(
        o.status.success() && text(&o).contains(&format!("stopped (pid {pid})")),
        "{}",
        text(&o)
    );
    assert!(!work.join("zk0-agent.pid").exists());
    let v = wait_status(&cfg, &envs, |v| v["running"] == false);
    assert_eq!(v["connected"], false);

    // A stale pidfile (a pid that is gone) reads as not running and is removed.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(work.join("zk0-agent.pid"), format!("{dead}\n")).unwrap();
    let o = agent(&["status", "--config", c], &envs);
    assert!(text(&o).contains("not running"), "{}", text(&o));
    assert!(!work.join("zk0-agent.pid").exists());
    let o = agent(&["stop", "--config", c], &envs);
    assert!(
        o.status.success() && text(&o).contains("not running"),
        "{}",
        text(&o)
    );
}
