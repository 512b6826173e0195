//! Both daemons speak systemd's `Type=notify` protocol: READY=1 once serving, WATCHDOG=1
//! at half of `WATCHDOG_USEC`, and a clean exit on SIGTERM (how systemd stops them).
//! The test plays systemd's part with a real notify socket.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use zk0_e2e::federation::{BrokerKind, Federation};
use zk0_e2e::{bin, ensure_built, free_port, ChildGuard};

/// Collects notify datagrams until `done` says enough, or the deadline passes.
fn collect(
    sock: &UnixDatagram,
    timeout: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let mut got = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < timeout && !done(&got) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

fn watchdog_env(sock_path: &std::path::Path) -> [(&'static str, String); 2] {
    [
        ("NOTIFY_SOCKET", sock_path.display().to_string()),
        // 400 ms: pings every 200 ms, so a few arrive quickly.
        ("WATCHDOG_USEC", "400000".to_string()),
    ]
}

fn sigterm(child: &ChildGuard) {
    child.signal("TERM");
}

fn ready_and_pinging(msgs: &[String]) -> bool {
    msgs.iter().any(|m| m.contains("READY=1"))
        && msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2
}

#[test]
fn daemons_notify_systemd_and_stop_on_sigterm() -> Result<()> {
    ensure_built()?;
    let dir = tempfile::tempdir()?;
    let worker = bin("zk0-fake-worker");
    let mut fed = Federation::setup(
        dir.path(),
        BrokerKind::Embedded,
        &worker,
        &[("robot-1", 10, "f32")],
    )?;
    let port = free_port()?;
    fed.port = port;

    // Aggregator.
    let agg_sock_path = dir.path().join("agg-notify.sock");
    let agg_sock = UnixDatagram::bind(&agg_sock_path)?;
    agg_sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut cmd = Command::new(bin("zk0-aggregator"));
    cmd.arg("--state-dir")
        .arg(dir.path().join("aggregator"))
        .args([
            "serve",
            "--insecure",
            "--federation",
            "e2e",
            "--min-clients",
            "1",
            "--metrics-listen",
            "",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .envs(watchdog_env(&agg_sock_path));
    let mut agg = ChildGuard::spawn("zk0-aggregator", cmd, &dir.path().join("aggregator.log"))?;
    let msgs = collect(&agg_sock, Duration::from_secs(30), ready_and_pinging);
    assert!(
        ready_and_pinging(&msgs),
        "aggregator sent {msgs:?}; log:\n{}",
        fed.logs()
    );

    // Agent, connected to that aggregator's embedded broker.
    let agent_sock_path = dir.path().join("agent-notify.sock");
    let agent_sock = UnixDatagram::bind(&agent_sock_path)?;
    agent_sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let env = watchdog_env(&agent_sock_path);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    fed.start_agent_env("robot-1", 0, &env)?;
    let msgs = collect(&agent_sock, Duration::from_secs(30), ready_and_pinging);
    assert!(
        ready_and_pinging(&msgs),
        "agent sent {msgs:?}; logs:\n{}",
        fed.logs()
    );

    // systemd's stop: SIGTERM, then a clean exit well inside TimeoutStopSec.
    let agent = fed.agents.get_mut("robot-1").unwrap();
    sigterm(agent);
    let st = agent.wait_timeout(Duration::from_secs(15))?;
    assert!(st.success(), "agent exit on SIGTERM: {st}");
    sigterm(&agg);
    let st = agg.wait_timeout(Duration::from_secs(15))?;
    assert!(st.success(), "aggregator exit on SIGTERM: {st}");
    Ok(())
}
