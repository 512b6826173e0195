//! Interop with LeRobot itself (issue 7, "done when" 2), through the venv from `cargo xtask setup`
//! (`ZK0_LEROBOT_PYTHON`, exported by `eval "$(cargo xtask env)"`):
//! - a dataset written by our writer loads in LeRobot 0.6.1's `LeRobotDataset` with identical
//!   values and camera frame means within tolerance;
//! - a multi-file, multi-chunk dataset written by LeRobot's writer passes `verify` and reads back
//!   through our reader exactly as LeRobot reads it.
//!
//! Without the venv the tests print why and pass, except under `CI` where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use lerobot_dataset::synth::{self, SynthConfig};
use lerobot_dataset::video::mean_rgb;
use lerobot_dataset::LeRobotDataset;
use serde_json::Value;

/// Pixel mean tolerance on a 0–255 scale (as in the fixtures' expected.json).
const TOL: f64 = 4.0;

fn python() -> Option<PathBuf> {
    match std::env::var_os("ZK0_LEROBOT_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but ZK0_LEROBOT_PYTHON is not: run `eval \"$(cargo xtask env)\"` after `cargo xtask setup --lerobot`"
            );
            eprintln!(
                "SKIPPED: ZK0_LEROBOT_PYTHON is unset (eval \"$(cargo xtask env)\" after `cargo xtask setup --lerobot`)"
            );
            None
        }
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// Runs a script offline with a scratch HF_HOME; returns stdout.
fn run_py(py: &Path, hf_home: &Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(py)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HOME", hf_home)
        .output()
        .expect("run LeRobot python");
    assert!(
        out.status.success(),
        "python {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Loads `root` with LeRobot and compares every frame's values, and the listed frames' camera
/// means, with our reader. Returns how many image frames were compared.
fn compare_with_lerobot(py: &Path, scratch: &Path, root: &Path, image_frames: &[usize]) -> usize {
    let ds = LeRobotDataset::open(root).unwrap();
    let list: Vec<String> = image_frames.iter().map(ToString::to_string).collect();
    let out = run_py(
        py,
        scratch,
        &[
            script("load_with_lerobot.py").as_os_str(),
            root.as_os_str(),
            "--images".as_ref(),
            list.join(",").as_ref(),
        ],
    );
    let lr: Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(lr["total_episodes"], ds.episodes().len());
    assert_eq!(lr["total_frames"], ds.len());
    assert_eq!(lr["fps"], ds.fps());
    let frames = lr["frames"].as_array().unwrap();
    assert_eq!(frames.len(), ds.len());
    let mut images = 0;
    let mut worst: f64 = 0.0;
    for theirs in frames {
        let i = theirs["index"].as_u64().unwrap() as usize;
        let ours = if image_frames.contains(&i) {
            ds.get(i).unwrap()
        } else {
            ds.get_values(i).unwrap()
        }
        .to_show_json();
        for k in ["index", "episode_index", "frame_index", "task"] {
            assert_eq!(ours[k], theirs[k], "frame {i}: {k}");
        }
        // float32 on both sides, widened exactly to f64.
        assert_eq!(
            ours["timestamp"].as_f64().map(|x| x as f32),
            theirs["timestamp"].as_f64().map(|x| x as f32),
            "frame {i}: timestamp"
        );
        let tf = theirs["features"].as_object().unwrap();
        assert!(!tf.is_empty());
        for (name, tv) in tf {
            let ov = &ours["features"][name];
            let (ov, tv) = (ov.as_array().unwrap(), tv.as_array().unwrap());
            assert_eq!(ov.len(), tv.len(), "frame {i}: {name} length");
            for (o, t) in ov.iter().zip(tv) {
                match (o.as_f64(), t.as_f64()) {
                    // Both are float32 widened to f64; compare as f32 so serde_json's last-ulp
                    // parsing of Python's shortest repr cannot matter.
                    (Some(a), Some(b)) => assert!(
                        a as f32 == b as f32,
                        "frame {i}: {name}: ours {ov:?}, LeRobot {tv:?}"
                    ),
                    _ => assert_eq!(o, t, "frame {i}: {name}"),
                }
            }
        }
        let ti = theirs["images"].as_object().unwrap();
        if image_frames.contains(&i) {
            assert_eq!(ti.len(), ds.camera_keys().len(), "frame {i}: cameras");
        }
        for (cam, t) in ti {
            let o = &ours["images"][cam]["mean_rgb"];
            for c in 0..3 {
                let (a, b) = (o[c].as_f64().unwrap(), t["mean_rgb"][c].as_f64().unwrap());
                worst = worst.max((a - b).abs());
                assert!(
                    (a - b).abs() <= TOL,
                    "frame {i} {cam} channel {c}: ours {a:.2}, LeRobot {b:.2}"
                );
            }
            images += 1;
        }
    }
    eprintln!(
        "{}: {} frames' values identical; {images} camera frames, largest mean difference {worst:.3}/255 (LeRobot video backend {})",
        root.display(),
        frames.len(),
        lr["video_backend"]
    );
    images
}

#[test]
fn our_dataset_loads_in_lerobot() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ours");
    let cfg = SynthConfig {
        episodes: 2,
        frames_per_episode: 24,
        // SVT-AV1 1.4 (Debian's ffmpeg) rejects heights below 64.
        cameras: vec![("front".into(), 96, 64)],
        ..Default::default()
    };
    let ds = synth::generate(&root, &cfg).unwrap();
    assert!(lerobot_dataset::verify::verify(&ds).problems.is_empty());
    // Our decoded means must also match the source colours, so both readers agree on the truth.
    for (ep, f) in [(0, 0), (1, 23)] {
        let img = &ds.get_episode_frame(ep, f).unwrap().images["observation.images.front"];
        let (l, r) = synth::frame_colours(ep, f, 0);
        let m = mean_rgb(img);
        for c in 0..3 {
            let want = (f64::from(l[c]) + f64::from(r[c])) / 2.0;
            assert!((m[c] - want).abs() <= TOL, "ep {ep} frame {f}: {m:?}");
        }
    }
    let picks = [0, 1, 11, 23, 24, 30, 47];
    let n = compare_with_lerobot(&py, &tmp.path().join("hf"), &root, &picks);
    assert_eq!(n, picks.len());
}

#[test]
fn lerobot_multichunk_dataset_verifies_and_reads_back() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("theirs");
    let hf = tmp.path().join("hf");
    run_py(
        &py,
        &hf,
        &[
            script("make_multichunk.py").as_os_str(),
            "--out".as_ref(),
            root.as_os_str(),
        ],
    );
    let files = |dir: &str| -> Vec<PathBuf> {
        let mut v = Vec::new();
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    v.push(p);
                }
            }
        }
        v
    };
    let chunks = |v: &[PathBuf]| -> std::collections::BTreeSet<PathBuf> {
        v.iter()
            .map(|p| p.parent().unwrap().to_path_buf())
            .collect()
    };
    let (data, videos, meta) = (files("data"), files("videos"), files("meta/episodes"));
    eprintln!(
        "LeRobot wrote {} data files in {} chunks, {} video files in {} chunks, {} episode-metadata files",
        data.len(),
        chunks(&data).len(),
        videos.len(),
        chunks(&videos).len(),
        meta.len()
    );
    assert!(data.len() > 2 && chunks(&data).len() > 1, "{data:?}");
    assert!(videos.len() > 2 && chunks(&videos).len() > 1, "{videos:?}");
    assert!(meta.len() > 1, "{meta:?}");

    let ds = LeRobotDataset::open(&root).unwrap();
    let report = lerobot_dataset::verify::verify(&ds);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // First and last frame of every episode, plus a middle one, decoded by both readers.
    let mut picks = Vec::new();
    for e in ds.episodes() {
        picks.extend([
            e.dataset_from_index,
            e.dataset_from_index + e.length / 2,
            e.dataset_to_index - 1,
        ]);
    }
    let n = compare_with_lerobot(&py, &hf, &root, &picks);
    assert_eq!(n, picks.len());
}
