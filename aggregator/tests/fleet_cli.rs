//! `zk0-aggregator start | status | stop` with real processes: a detached daemon with a
//! pidfile and a log in the state dir, a second start refused, a stale pidfile handled, and
//! `status` listing clients with their last losses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use shared_proto::tensor::{write_safetensors, Tensor, TensorSet};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_zk0-aggregator")
}

fn run(state: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("running zk0-aggregator")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !matches!(
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().as_bytes()[0]),
                Some(b'Z')
            )
        })
        .unwrap_or(false)
}

fn init(dir: &Path) -> PathBuf {
    let state = dir.join("state");
    let mut set = TensorSet::new();
    set.insert("w".into(), Tensor::new(vec![2, 2], vec![0.5; 4]).unwrap());
    let model = dir.join("model.safetensors");
    std::fs::write(&model, write_safetensors(&set, &BTreeMap::new())).unwrap();
    let o = run(&state, &["init", "--model", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    state
}

fn start(state: &Path, port: u16) -> Output {
    let listen = format!("127.0.0.1:{port}");
    run(
        state,
        &[
            "start",
            "--insecure",
            "--listen",
            &listen,
            "--metrics-listen=",
        ],
    )
}

fn pid_of(state: &Path) -> u32 {
    std::fs::read_to_string(state.join("zk0-aggregator.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn start_status_stop_and_refuse_twice() {
    let dir = tempfile::tempdir().unwrap();
    let state = init(dir.path());
    let port = free_port();

    let o = start(&state, port);
    assert!(o.status.success(), "{}", text(&o));
    let pid = pid_of(&state);
    assert!(text(&o).contains(&format!("pid {pid}")), "{}", text(&o));
    assert!(alive(pid), "daemon {pid} not running");
    // The daemon really serves: its embedded broker accepts connections.
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "broker never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let o = run(&state, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("daemon:    running (pid {pid})")),
        "{}",
        text(&o)
    );

    let o = start(&state, free_port());
    assert!(!o.status.success(), "second start must be refused");
    assert!(text(&o).contains("already running"), "{}", text(&o));
    assert_eq!(
        pid_of(&state),
        pid,
        "the refused start must not touch the pidfile"
    );

    let o = run(&state, &["stop"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("stopped (pid {pid})")),
        "{}",
        text(&o)
    );
    assert!(!alive(pid));
    assert!(!state.join("zk0-aggregator.pid").exists());
    let log = std::fs::read_to_string(state.join("zk0-aggregator.log")).unwrap();
    assert!(log.contains("aggregator started"), "log: {log}");

    let o = run(&state, &["stop"]);
    assert!(
        o.status.success() && text(&o).contains("not running"),
        "{}",
        text(&o)
    );
    let o = run(&state, &["status"]);
    assert!(text(&o).contains("daemon:    not running"), "{}", text(&o));
}

#[test]
fn stale_pidfile_is_replaced_and_a_failing_start_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let state = init(dir.path());
    // A pid that existed and is gone now.
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    std::fs::write(state.join("zk0-aggregator.pid"), format!("{dead}\n")).unwrap();
    let o = run(&state, &["status"]);
    assert!(text(&o).contains("daemon:    not running"), "{}", text(&o));
    assert!(
        !state.join("zk0-aggregator.pid").exists(),
        "stale pidfile removed"
    );

    std::fs::write(state.join("zk0-aggregator.pid"), format!("{dead}\n")).unwrap();
    let o = start(&state, free_port());
    assert!(o.status.success(), "{}", text(&o));
    let pid = pid_of(&state);
    assert_ne!(pid, dead);
    let o = run(&state, &["stop"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!alive(pid));

    // Without --insecure and without credentials, serve exits at once: start says so, with
    // the log's reason, and leaves no pidfile.
    let o = run(&state, &["start", "--metrics-listen="]);
    assert!(!o.status.success());
    assert!(text(&o).contains("exited at start"), "{}", text(&o));
    assert!(text(&o).contains("no broker credentials"), "{}", text(&o));
    assert!(!state.join("zk0-aggregator.pid").exists());

    let o = run(
        dir.path().join("nothing").as_path(),
        &["start", "--insecure"],
    );
    assert!(
        !o.status.success() && text(&o).contains("run `init` first"),
        "{}",
        text(&o)
    );
}

#[test]
fn status_lists_clients_with_last_losses_and_next_lr() {
    let dir = tempfile::tempdir().unwrap();
    let state = init(dir.path());
    // The schedule state as a closed round leaves it (round 2 next, client b boosted).
    let path = state.join("state.json");
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    s["round"] = 2.into();
    s["schedule"] = serde_json::json!({
        "observed_round": 1,
        "round_losses": [1.5],
        "last_client_losses": {"robot-a": 0.25, "robot-b": 4.0},
        "lr_factors": {"robot-b": 1.15}
    });
    std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
    let cfg = dir.path().join("agg.toml");
    std::fs::write(
        &cfg,
        "[rounds]\nlr = 1e-4\n[[datasets.clients]]\nrepo_id = \"lerobot/so100_a\"\nclient_id = \"robot-a\"\n",
    )
    .unwrap();
    let o = Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .arg("status")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    // Round 2 of the warm-restart cosine: 5e-7 + (1e-4 - 5e-7)(1 + cos(π/15))/2.
    let lr2 = 5e-7 + (1e-4 - 5e-7) * (1.0 + (std::f64::consts::PI / 15.0).cos()) / 2.0;
    let line = |c: &str| {
        t.lines()
            .find(|l| l.trim_start().starts_with(c))
            .unwrap_or_default()
            .to_string()
    };
    let a = line("robot-a");
    assert!(
        a.contains("last loss 0.250000") && a.contains("dataset lerobot/so100_a"),
        "{t}"
    );
    assert!(a.contains(&format!("next lr {lr2:.3e}")), "{a}");
    let b = line("robot-b");
    assert!(b.contains("last loss 4.000000"), "{t}");
    assert!(b.contains(&format!("next lr {:.3e}", lr2 * 1.15)), "{b}");
    assert!(
        t.contains(&format!("schedule:  round 2 lr {lr2:.3e}")),
        "{t}"
    );
}
