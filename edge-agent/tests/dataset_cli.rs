//! `zk0-agent dataset …` run as the real binary against every vendored LeRobot fixture.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(name)
}

fn agent(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zk0-agent"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn f32s(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(f32s).collect(),
        Value::Bool(b) => vec![f32::from(u8::from(*b))],
        x => vec![x.as_f64().unwrap() as f32],
    }
}

/// `dataset show` prints each expected frame exactly (pixel means within the tolerance).
fn check_show(name: &str) {
    check_show_at(name, &fixture(name));
}

fn check_show_at(name: &str, dir: &std::path::Path) {
    let exp: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{name}.expected.json"))).unwrap(),
    )
    .unwrap();
    let tol = exp["pixel_mean_tolerance_0_255"].as_f64().unwrap();
    for fr in exp["frames"].as_array().unwrap() {
        let (e, f) = (
            fr["episode_index"].to_string(),
            fr["frame_index"].to_string(),
        );
        let (ok, out, err) = agent(&[
            "dataset",
            "show",
            dir.to_str().unwrap(),
            "--episode",
            &e,
            "--frame",
            &f,
            "--json",
        ]);
        assert!(ok, "{name} e{e} f{f}: {err}");
        let got: Value = serde_json::from_str(&out).unwrap();
        let keys: Vec<&String> = got.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "episode_index",
                "features",
                "frame_index",
                "images",
                "index",
                "task",
                "timestamp"
            ]
        );
        for k in ["episode_index", "frame_index", "index", "task"] {
            assert_eq!(got[k], fr[k], "{name} {k}");
        }
        assert_eq!(
            got["timestamp"].as_f64().unwrap() as f32,
            fr["timestamp"].as_f64().unwrap() as f32
        );
        for (k, v) in fr.as_object().unwrap() {
            if k.starts_with("images_")
                || ["episode_index", "frame_index", "index", "task", "timestamp"]
                    .contains(&k.as_str())
            {
                continue;
            }
            let g = &got["features"][k];
            assert!(g.is_array(), "{name}: feature {k} missing from show output");
            if let Value::Bool(b) = v {
                assert_eq!(g, &serde_json::json!([b]));
            } else {
                assert_eq!(f32s(g), f32s(v), "{name} e{e} f{f} {k}");
            }
        }
        let cams = fr["images_mean_rgb_0_255"].as_object().unwrap();
        assert_eq!(got["images"].as_object().unwrap().len(), cams.len());
        for (cam, mean) in cams {
            let g = f32s(&got["images"][cam]["mean_rgb"]);
            for (c, w) in f32s(mean).into_iter().enumerate() {
                assert!(
                    (g[c] - w).abs() as f64 <= tol,
                    "{name} e{e} f{f} {cam} channel {c}: {} vs {w}",
                    g[c]
                );
            }
        }
    }
    // `info --json` agrees with the expected summary.
    let (ok, out, err) = agent(&["dataset", "info", dir.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    for k in [
        "codebase_version",
        "fps",
        "robot_type",
        "total_episodes",
        "total_frames",
    ] {
        assert_eq!(info[k], exp[k], "{name} info {k}");
    }
    for f in exp["files"].as_array().unwrap() {
        assert!(
            info["files"].as_array().unwrap().contains(f),
            "{name}: {f} not listed"
        );
    }
    let (ok, out, _) = agent(&["dataset", "info", dir.to_str().unwrap()]);
    assert!(ok && out.contains("frames"));
}

#[test]
fn show_v3_tiny() {
    check_show("lerobot-v3-tiny");
}

#[test]
fn show_v3_edge() {
    check_show("lerobot-v3-edge");
}

#[test]
fn show_v21_tiny() {
    check_show("lerobot-v21-tiny");
}

#[test]
fn show_v3_converted_tiny() {
    check_show("lerobot-v3-converted-tiny");
}

#[test]
fn show_out_of_range_is_a_clear_error() {
    let dir = fixture("lerobot-v3-tiny");
    let (ok, _, err) = agent(&[
        "dataset",
        "show",
        dir.to_str().unwrap(),
        "--episode",
        "3",
        "--frame",
        "0",
        "--json",
    ]);
    assert!(!ok);
    assert!(err.contains("episode 3 out of range"), "{err}");
    let (ok, _, err) = agent(&[
        "dataset",
        "show",
        dir.to_str().unwrap(),
        "--episode",
        "0",
        "--frame",
        "24",
        "--json",
    ]);
    assert!(!ok);
    assert!(err.contains("episode 0 has 24 frames"), "{err}");
}

#[test]
fn verify_fixtures_and_a_broken_copy() {
    for name in [
        "lerobot-v3-tiny",
        "lerobot-v3-edge",
        "lerobot-v21-tiny",
        "lerobot-v3-converted-tiny",
    ] {
        let (ok, out, err) = agent(&["dataset", "verify", fixture(name).to_str().unwrap()]);
        assert!(ok && out.starts_with("ok:"), "{name}: {out} {err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let src = fixture("lerobot-v3-tiny");
    for f in [
        "meta/info.json",
        "meta/stats.json",
        "meta/tasks.parquet",
        "meta/episodes/chunk-000/file-000.parquet",
        "data/chunk-000/file-000.parquet",
    ] {
        std::fs::create_dir_all(dir.join(f).parent().unwrap()).unwrap();
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // No videos copied: verify reports the missing mp4 by file and episode.
    let (ok, _, err) = agent(&["dataset", "verify", dir.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("videos/observation.images.front/chunk-000/file-000.mp4")
            && err.contains("episode 0")
            && err.contains("missing"),
        "{err}"
    );
}

/// Issue 11: a dataset whose video drifts from its metadata (the old writer's episode joins,
/// `lerobot-dataset/examples/make_drifted_fixture.rs`) fails `verify`, which names each
/// drifting episode and its camera, and passes the first, which does not drift.
#[test]
fn verify_names_episodes_whose_video_drifts_from_the_metadata() {
    let (ok, out, err) = agent(&[
        "dataset",
        "verify",
        fixture("lerobot-v3-drifted-h264").to_str().unwrap(),
    ]);
    assert!(!ok, "{out}");
    let problems: Vec<&str> = err.lines().filter(|l| l.starts_with("problem:")).collect();
    assert_eq!(problems.len(), 2, "{err}");
    for (p, ep) in problems.iter().zip([1, 2]) {
        assert!(
            p.contains(&format!("episode {ep}: observation.images.front: frame 0 "))
                && p.contains("tolerance 0.0001s"),
            "{p}"
        );
    }
    assert!(err.contains("2 problem(s) found"), "{err}");
}

/// The v2.1 fixture after `dataset convert` reads back as LeRobot's own conversion's expected.json.
#[test]
fn convert_v21_then_show() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("converted");
    let (ok, stdout, err) = agent(&[
        "dataset",
        "convert",
        fixture("lerobot-v21-tiny").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("3 episodes, 75 frames"), "{stdout}");
    let (ok, _, err) = agent(&["dataset", "verify", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    check_show_at("lerobot-v3-converted-tiny", &out);
}

/// `kill -9` while episodes are being saved leaves a dataset that verifies, with every committed
/// episode intact.
#[test]
fn kill_9_during_save_leaves_a_valid_dataset() {
    // Different delays land the kill in different phases of a save.
    for delay_ms in [0, 13, 37, 71] {
        kill_9_after(delay_ms);
    }
}

fn kill_9_after(delay_ms: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let mut child = Command::new(env!("CARGO_BIN_EXE_zk0-agent"))
        .args([
            "dataset",
            "synth",
            dir.to_str().unwrap(),
            "--episodes",
            "500",
            "--frames",
            "20",
            "--camera",
            "front:64x64",
            "--vcodec",
            "libx264",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let info = dir.join("meta/info.json");
    let committed = |p: &std::path::Path| -> u64 {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["total_episodes"].as_u64())
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    while committed(&info) < 3 && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Land somewhere inside the next save.
    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let n = committed(&info);
    assert!((3..500).contains(&n), "{n} episodes committed");
    let (ok, out, err) = agent(&["dataset", "verify", dir.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    for e in 0..n {
        let (ok, out, err) = agent(&[
            "dataset",
            "show",
            dir.to_str().unwrap(),
            "--episode",
            &e.to_string(),
            "--frame",
            "19",
            "--json",
        ]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["index"].as_u64().unwrap(), e * 20 + 19);
    }
}

/// `--repo-id` resolves through the hf-hub cache; offline mode never touches the network.
#[test]
fn repo_id_from_offline_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--local--tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "c0ffee").unwrap();
    let snap = repo.join("snapshots/c0ffee");
    let src = fixture("lerobot-v3-tiny");
    for f in [
        "meta/info.json",
        "meta/stats.json",
        "meta/tasks.parquet",
        "meta/episodes/chunk-000/file-000.parquet",
        "data/chunk-000/file-000.parquet",
        "videos/observation.images.front/chunk-000/file-000.mp4",
    ] {
        std::fs::create_dir_all(snap.join(f).parent().unwrap()).unwrap();
        std::fs::copy(src.join(f), snap.join(f)).unwrap();
    }
    let run = |repo_id: &str| {
        Command::new(env!("CARGO_BIN_EXE_zk0-agent"))
            .args([
                "dataset",
                "show",
                "--repo-id",
                repo_id,
                "--episode",
                "1",
                "--frame",
                "5",
                "--json",
            ])
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_CACHE", cache.path())
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let out = run("local/tiny");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["index"], 29);
    let out = run("local/absent");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HF_HUB_OFFLINE"));
}

/// A relative output path works (ffmpeg's concat list once doubled it).
#[test]
fn synth_into_a_relative_path_then_verify() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_zk0-agent"))
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "dataset",
        "synth",
        "ds",
        "--episodes",
        "2",
        "--frames",
        "10",
        "--camera",
        "front:64x64",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["dataset", "verify", "ds"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 episodes, 20 frames"));
}
