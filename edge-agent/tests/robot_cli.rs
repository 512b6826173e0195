//! `zk0-agent teleop | calibrate | record` run as the real binary with `--sim` (both arms on
//! the in-process emulator): what a user without an arm can try, and the refusals a user
//! with one meets first.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use zk0_robot::arm::ArmSpec;
use zk0_robot::{ArmModel, Calibration, Role};

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zk0-agent"));
    c.env("RUST_LOG", "warn");
    c
}

/// Runs `cmd` with `lines` written to its stdin, each after its delay; its output once it
/// exits (within 30 s).
fn with_stdin(mut cmd: Command, lines: &[(u64, &str)]) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for (ms, line) in lines {
        std::thread::sleep(Duration::from_millis(*ms));
        stdin.write_all(line.as_bytes()).unwrap();
    }
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{cmd:?} did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn config(dir: &std::path::Path, robot: &str) -> std::path::PathBuf {
    let p = dir.join("agent.toml");
    std::fs::write(&p, format!("[robot]\n{robot}")).unwrap();
    p
}

#[test]
fn teleop_on_the_emulator_runs_at_the_rate_and_stops_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let t = Instant::now();
    let out = agent()
        .args(["teleop", "--sim", "--fps", "50", "--time-s", "1"])
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(20));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ticks = s["ticks"].as_u64().unwrap();
    assert!((45..=52).contains(&ticks), "{s}");
    assert!(
        (s["mean_period_s"].as_f64().unwrap() - 0.02).abs() < 0.005,
        "{s}"
    );
    assert!(stderr.contains("action"), "{stderr}");
}

#[test]
fn calibrate_on_the_emulator_writes_a_lerobot_file() {
    let dir = tempfile::tempdir().unwrap();
    let cal = dir.path().join("cal");
    let cfg = config(
        dir.path(),
        &format!(
            "calibration_dir = \"{}\"\nleader_id = \"arm7\"\n",
            cal.display()
        ),
    );
    let mut cmd = agent();
    cmd.args(["calibrate", "--sim", "--arm", "leader"])
        .arg("--config")
        .arg(&cfg);
    // ENTER at the middle pose, then ENTER once the (emulated) hand has swept the joints.
    let out = with_stdin(cmd, &[(0, "\n"), (1500, "\n")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("middle of its range"), "{stderr}");
    let path = ArmSpec::new(ArmModel::So101, Role::Leader).calibration_path(&cal, "arm7");
    let motors = ArmSpec::new(ArmModel::So101, Role::Leader).motors(true);
    let ids: Vec<(&str, u8)> = motors.iter().map(|m| (m.name, m.id)).collect();
    let c = Calibration::load(&path, &ids).unwrap();
    for (name, m) in &c.motors {
        assert!(m.range_min < m.range_max, "{name}: {m:?}");
        if name != "wrist_roll" {
            // The joints swept over raw 1400..2700 around the middle pose's offset.
            assert!(m.range_max - m.range_min > 200, "{name}: {m:?}");
        }
    }
}

#[test]
fn record_refuses_what_it_cannot_do_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let run = |robot: &str, extra: &[&str]| {
        let cfg = config(dir.path(), robot);
        let out = agent()
            .args(["record", "--sim", "--repo-id", "me/x", "--task", "t"])
            .arg("--config")
            .arg(&cfg)
            .arg("--dataset")
            .arg(dir.path().join("ds"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(
        "[[robot.cameras]]\nname = \"top\"\nkind = \"v4l2\"\ndevice = \"/dev/video0\"\n",
        &[],
    );
    assert!(e.contains("camera top") && e.contains("V4L2"), "{e}");
    let e = run(
        "[[robot.cameras]]\nname = \"top\"\nwidth = 32\nheight = 32\n",
        &[],
    );
    assert!(e.contains("camera top") && e.contains("64x64"), "{e}");
    let e = run("", &["--episodes", "0"]);
    assert!(e.contains("--episodes"), "{e}");
    assert!(
        !dir.path().join("ds").exists(),
        "nothing written on a refusal"
    );
    std::fs::create_dir_all(dir.path().join("ds/meta")).unwrap();
    std::fs::write(dir.path().join("ds/meta/info.json"), "{}").unwrap();
    let e = run("", &[]);
    assert!(e.contains("already holds a dataset"), "{e}");
}

#[test]
fn a_dataset_left_without_episodes_is_started_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    // What a run that failed before its first save leaves: info.json, no episode.
    let cfg = lerobot_dataset::DatasetConfig::so100(&[("old", 64, 64)]);
    drop(lerobot_dataset::DatasetWriter::create(&ds, cfg).unwrap());
    let out = agent()
        .args([
            "record",
            "--sim",
            "--repo-id",
            "me/x",
            "--task",
            "t",
            "--episodes",
            "1",
        ])
        .args(["--episode-time-s", "0.5", "--fps", "10"])
        .arg("--config")
        .arg(config(dir.path(), ""))
        .arg("--dataset")
        .arg(&ds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = lerobot_dataset::Info::load(&ds).unwrap();
    assert_eq!((info.total_episodes, info.total_frames), (1, 5));
    assert!(info.features.get("observation.images.old").is_none());
}

#[test]
fn q_on_stdin_saves_the_episode_under_way_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "[[robot.cameras]]\nname = \"front\"\nwidth = 64\nheight = 64\nfps = 10\n",
    );
    let ds = dir.path().join("ds");
    let mut cmd = agent();
    cmd.args(["record", "--sim", "--repo-id", "me/x", "--task", "t"])
        .args(["--episodes", "3", "--episode-time-s", "60", "--fps", "10"])
        .arg("--config")
        .arg(&cfg)
        .arg("--dataset")
        .arg(&ds);
    let out = with_stdin(cmd, &[(1500, "q\n")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = String::from_utf8_lossy(&out.stdout);
    let s: Value = serde_json::from_str(line.trim().lines().last().unwrap()).unwrap();
    let saved = s["saved"].as_array().unwrap();
    assert_eq!(saved.len(), 1, "{s}");
    let n = saved[0].as_u64().unwrap();
    assert!(
        (3..=40).contains(&n),
        "{n} frames after about a second at 10 fps: {s}"
    );
    assert_eq!(s["interrupted"], false);
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(ds.join("meta/info.json")).unwrap()).unwrap();
    assert_eq!(info["total_episodes"], 1);
    assert_eq!(info["total_frames"], n);
}
