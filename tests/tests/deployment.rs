//! What gets deployed: the daemons link no libtorch, their systemd units verify cleanly,
//! and `zk0-agent doctor --json` reports what a robot host needs.
//!
//! These run the binaries `cargo xtask test` builds first (`cargo build --workspace --bins`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn bin(name: &str) -> PathBuf {
    let p = target_dir().join("debug").join(name);
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --workspace --bins` (cargo xtask test does)",
        p.display()
    );
    p
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// In CI a missing system tool is a failure, not a skip.
fn require_tool(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing in CI (.ci/run installs it)"
        );
        eprintln!("skipped: {tool} not installed");
    }
    ok
}

fn ldd(path: &Path) -> String {
    let out = Command::new("ldd").arg(path).output().expect("ldd runs");
    assert!(out.status.success(), "ldd {} failed", path.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn links_libtorch(ldd_out: &str) -> bool {
    ldd_out.lines().any(|l| {
        let name = l.trim_start();
        name.starts_with("libtorch") || name.starts_with("libc10")
    })
}

#[test]
fn daemons_do_not_link_libtorch() {
    for name in ["zk0-agent", "zk0-aggregator"] {
        let deps = ldd(&bin(name));
        assert!(!links_libtorch(&deps), "{name} links libtorch:\n{deps}");
        assert!(
            deps.contains("libc.so"),
            "ldd output for {name} looks wrong:\n{deps}"
        );
    }
    // The same check sees libtorch where it is (zk0-train), so its silence above means something.
    let train = target_dir().join("debug/zk0-train");
    if train.is_file() {
        assert!(
            links_libtorch(&ldd(&train)),
            "zk0-train should link libtorch"
        );
    }
}

/// Copies the units with ExecStart pointing at the built binaries, then runs
/// `systemd-analyze verify`, which must print nothing at all.
fn verify_units(units: &[(&str, String)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, text) in units {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && msg.trim().is_empty(), msg)
}

fn unit_with_local_binary(name: &str) -> String {
    let text =
        std::fs::read_to_string(repo().join("systemd").join(format!("{name}.service"))).unwrap();
    let exec = format!("/usr/bin/{name} ");
    assert!(
        text.contains(&exec),
        "{name}.service must start /usr/bin/{name}"
    );
    text.replace(&exec, &format!("{} ", bin(name).display()))
}

#[test]
fn systemd_units_verify_without_warnings() {
    if !require_tool("systemd-analyze") {
        return;
    }
    let units: Vec<(&str, String)> = ["zk0-agent", "zk0-aggregator"]
        .iter()
        .map(|n| {
            (
                if *n == "zk0-agent" {
                    "zk0-agent.service"
                } else {
                    "zk0-aggregator.service"
                },
                unit_with_local_binary(n),
            )
        })
        .collect();
    for (_, text) in &units {
        for key in [
            "Type=notify",
            "WatchdogSec=",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "StateDirectory=",
        ] {
            assert!(text.contains(key), "unit lacks {key}");
        }
    }
    assert!(units[0].1.contains("SupplementaryGroups=dialout video"));
    let (ok, msg) = verify_units(&units);
    assert!(ok, "systemd-analyze verify complained:\n{msg}");

    // A misspelt directive must be caught, or this test proves nothing.
    let broken = units[0]
        .1
        .replace("Restart=on-failure", "Restartt=on-failure");
    let (ok, msg) = verify_units(&[("zk0-agent.service", broken)]);
    assert!(
        !ok && msg.contains("Restartt"),
        "verify missed a bad directive: {msg}"
    );
}

#[test]
fn sysusers_puts_the_agent_in_dialout_and_video() {
    let text = std::fs::read_to_string(repo().join("systemd/zk0.sysusers.conf")).unwrap();
    let lines: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    for user in ["zk0-agent", "zk0-aggregator"] {
        assert!(
            lines.iter().any(|l| l[0] == "u" && l[1] == user),
            "no user {user}"
        );
    }
    for group in ["dialout", "video"] {
        assert!(
            lines.iter().any(|l| l[..3] == ["m", "zk0-agent", group]),
            "zk0-agent not in {group}"
        );
    }
    for unit in ["zk0-agent", "zk0-aggregator"] {
        let text = std::fs::read_to_string(repo().join(format!("systemd/{unit}.service"))).unwrap();
        assert!(
            text.contains(&format!("User={unit}")),
            "{unit}.service runs as another user"
        );
    }
}

#[test]
fn doctor_json_reports_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "client_id = \"robot-1\"\ninsecure = true\n").unwrap();
    let out = Command::new(bin("zk0-agent"))
        .args(["doctor", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON");
    assert_eq!(v["host"]["arch"], std::env::consts::ARCH);
    assert!(v["host"]["cores"].as_u64().unwrap() >= 1);
    assert!(v["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert!(v["disk"]["available_bytes"].is_u64());
    assert!(v.get("gpu").is_some(), "gpu key present (null without one)");
    assert!(v["serial_ports"].is_array() && v["video_devices"].is_array());
    assert_eq!(v["config"]["found"], true);
    assert_eq!(v["config"]["valid"], true);
    assert_eq!(v["config"]["path"], config.display().to_string());
    // onnxruntime: found with its version wherever cargo xtask set ORT_DYLIB_PATH.
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        assert_eq!(
            v["onnxruntime"]["path"],
            Path::new(&p).display().to_string()
        );
        assert!(
            v["onnxruntime"]["version"]
                .as_str()
                .is_some_and(|s| s.contains('.')),
            "{}",
            v["onnxruntime"]
        );
    }
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "cpu",
        "memory",
        "disk",
        "gpu",
        "onnxruntime",
        "serial ports",
        "cameras",
        "config",
    ] {
        assert!(names.contains(&n), "check {n} missing from {names:?}");
    }

    // A broken config is reported as such.
    std::fs::write(&config, "client_id = \n").unwrap();
    let out = Command::new(bin("zk0-agent"))
        .args(["doctor", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"]["valid"], false);
    assert!(v["config"]["error"].as_str().is_some());
}

/// The shipped example configs are accepted by the daemons' own loaders and checks.
#[test]
fn example_configs_are_valid() {
    let agent = repo().join("systemd/agent.example.toml");
    let out = Command::new(bin("zk0-agent"))
        .args(["doctor", "--json", "--config"])
        .arg(&agent)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"]["valid"], true, "{}", v["config"]);

    let agg = repo().join("systemd/aggregator.example.toml");
    let out = Command::new(bin("zk0-aggregator"))
        .arg("--config")
        .arg(&agg)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "config")
        .unwrap();
    assert_eq!(config["status"], "ok", "{config}");
}
