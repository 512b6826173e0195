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
use lerobot_dataset::video::{mean_rgb, EncoderConfig};
use lerobot_dataset::LeRobotDataset;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use zk0_host::reference::lerobot_python;

/// Pixel mean tolerance on a 0–255 scale (as in the fixtures' expected.json).
const TOL: f64 = 4.0;

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
    let Some(py) = lerobot_python() else { return };
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
    let Some(py) = lerobot_python() else { return };
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

/// The seed of this run's random episode lengths: `ZK0_TEST_SEED` reproduces a run.
fn seed() -> u64 {
    let seed = std::env::var("ZK0_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
    eprintln!("episode-length seed {seed} (ZK0_TEST_SEED={seed} reproduces this run)");
    seed
}

/// `n` random episode lengths in `range`, plus `fixed` ones, shuffled: lengths that are and
/// are not whole numbers of a container's ticks.
fn lengths(
    rng: &mut ChaCha8Rng,
    range: std::ops::RangeInclusive<usize>,
    n: usize,
    fixed: &[usize],
) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n)
        .map(|_| rng.gen_range(range.clone()))
        .chain(fixed.iter().copied())
        .collect();
    v.shuffle(rng);
    v
}

fn encoder(vcodec: &str) -> EncoderConfig {
    EncoderConfig {
        vcodec: vcodec.into(),
        ..Default::default()
    }
}

/// Datasets of our writer across codecs, camera counts, awkward episode lengths, several
/// episodes per video file and file and chunk rollovers, plus a v2.1 dataset LeRobot wrote,
/// converted by us. Each is checked by our `verify` before it is returned.
fn written_datasets(dir: &Path, seed: u64) -> Vec<(String, LeRobotDataset)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // SVT-AV1 1.4 (Debian's ffmpeg) rejects heights below 64.
    let front = || ("front".to_string(), 96, 64);
    let cases = [
        (
            "libsvtav1, 1 camera",
            SynthConfig {
                episode_lengths: lengths(&mut rng, 1..=47, 3, &[29, 17]),
                cameras: vec![front()],
                ..Default::default()
            },
        ),
        (
            "libx264, 2 cameras",
            SynthConfig {
                episode_lengths: lengths(&mut rng, 1..=47, 3, &[40, 1]),
                cameras: vec![front(), ("wrist".into(), 64, 64)],
                encoder: encoder("libx264"),
                ..Default::default()
            },
        ),
        (
            "mpeg4 (any other --vcodec), 1 camera",
            SynthConfig {
                episode_lengths: lengths(&mut rng, 1..=47, 4, &[]),
                cameras: vec![front()],
                encoder: encoder("mpeg4"),
                ..Default::default()
            },
        ),
        (
            "libsvtav1, video/data file and chunk rollovers",
            SynthConfig {
                // Long enough that every size estimate rolls over within a few episodes.
                episode_lengths: lengths(&mut rng, 12..=47, 8, &[29]),
                cameras: vec![front()],
                // A few episodes per video file (~2.5 kB each), then the next file; 2 files
                // per chunk.
                video_files_size_in_mb: Some(0.005),
                data_files_size_in_mb: Some(0.01),
                chunks_size: Some(2),
                ..Default::default()
            },
        ),
    ];
    let mut out = Vec::new();
    for (i, (label, mut cfg)) in cases.into_iter().enumerate() {
        cfg.seed = seed.wrapping_add(i as u64);
        let root = dir.join(format!("case{i}"));
        let ds = synth::generate(&root, &cfg).unwrap();
        eprintln!("{label}: episode lengths {:?}", cfg.episode_lengths);
        out.push((format!("{label} (lengths {:?})", cfg.episode_lengths), ds));
    }
    let converted = dir.join("converted");
    let ds = lerobot_dataset::convert::convert_v21_to_v30(&fixture("lerobot-v21-tiny"), &converted)
        .unwrap();
    out.push(("v2.1 by LeRobot, converted by us".into(), ds));
    for (label, ds) in &out {
        let report = lerobot_dataset::verify::verify(ds);
        assert!(report.problems.is_empty(), "{label}: {:?}", report.problems);
    }
    // The rollover case really spans files and chunks, with several episodes in some file.
    let rolled = &out[3].1;
    let files: std::collections::BTreeSet<_> = rolled
        .episodes()
        .iter()
        .map(|e| e.videos["observation.images.front"].path.clone())
        .collect();
    let chunks: std::collections::BTreeSet<_> = files
        .iter()
        .map(|p| p.parent().unwrap().to_path_buf())
        .collect();
    assert!(
        files.len() >= 3 && chunks.len() >= 2,
        "no rollover: {files:?}"
    );
    assert!(
        files.len() < rolled.episodes().len(),
        "one episode per file: {files:?}"
    );
    out
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Reads every item of each root through LeRobot's `LeRobotDataset` (its default tolerance;
/// `backend` None: its default video backend, as `lerobot-train` reads them); one JSON value
/// per root.
fn read_every_item_in_lerobot(
    py: &Path,
    hf_home: &Path,
    backend: Option<&str>,
    roots: &[&Path],
) -> Vec<Value> {
    let mut args = vec![script("read_every_item.py").into_os_string()];
    if let Some(b) = backend {
        args.extend(["--backend".into(), b.into()]);
    }
    args.extend(roots.iter().map(|r| r.as_os_str().to_os_string()));
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run_py(py, hf_home, &args)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Issue 11: LeRobot reads every item of every dataset we write or convert, with its default
/// backend and 1e-4 s tolerance, and gets the very frames our reader returns.
#[test]
fn every_item_of_datasets_we_write_reads_in_lerobot() {
    let Some(py) = lerobot_python() else { return };
    let seed = seed();
    let tmp = tempfile::tempdir().unwrap();
    let datasets = written_datasets(tmp.path(), seed);
    let roots: Vec<&Path> = datasets.iter().map(|(_, ds)| ds.root()).collect();
    // LeRobot's default backend (torchcodec: frames by index) and pyav (nearest timestamp).
    let mut theirs = read_every_item_in_lerobot(&py, &tmp.path().join("hf"), None, &roots);
    theirs.extend(read_every_item_in_lerobot(
        &py,
        &tmp.path().join("hf"),
        Some("pyav"),
        &roots,
    ));
    assert_eq!(theirs.len(), 2 * datasets.len());
    for ((label, ds), lr) in datasets.iter().cycle().zip(&theirs) {
        assert!(
            lr["error"].is_null(),
            "{label} (seed {seed}): LeRobot: {}",
            lr["error"]
        );
        assert_eq!(lr["items"], ds.len(), "{label}");
        assert_eq!(
            lr["tolerance_s"], 1e-4,
            "{label}: LeRobot's default tolerance"
        );
        let cams: Vec<String> = serde_json::from_value(lr["camera_keys"].clone()).unwrap();
        let mut worst: f64 = 0.0;
        for i in 0..ds.len() {
            let ours = ds.get(i).unwrap();
            for (c, cam) in cams.iter().enumerate() {
                let m = mean_rgb(&ours.images[cam]);
                for k in 0..3 {
                    let t = lr["means"][i][c][k].as_f64().unwrap();
                    worst = worst.max((m[k] - t).abs());
                    // Neighbouring synthetic frames differ by ≥ 3/255 in some channel; the
                    // same frame through the same swscale path agrees far closer.
                    assert!(
                        (m[k] - t).abs() <= 1.0,
                        "{label} (seed {seed}): item {i} {cam} channel {k}: ours {:.2}, LeRobot {t:.2}",
                        m[k]
                    );
                }
            }
        }
        eprintln!(
            "{label}: LeRobot ({} backend) read all {} items; largest camera mean difference to ours {worst:.3}/255",
            lr["video_backend"], ds.len()
        );
    }
}

/// Issue 11: `lerobot-train` itself trains a few steps on a dataset we wrote (awkward episode
/// lengths, AV1, several episodes in one file) and on one we converted.
#[test]
fn lerobot_train_runs_on_datasets_we_write_and_convert() {
    let Some(py) = lerobot_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours");
    synth::generate(
        &ours,
        &SynthConfig {
            episode_lengths: vec![29, 17, 23],
            cameras: vec![("front".into(), 96, 64)],
            ..Default::default()
        },
    )
    .unwrap();
    let converted = tmp.path().join("converted");
    lerobot_dataset::convert::convert_v21_to_v30(&fixture("lerobot-v21-tiny"), &converted).unwrap();
    let train = py.with_file_name("lerobot-train");
    assert!(train.is_file(), "{} is missing", train.display());
    for (label, root) in [("written", &ours), ("converted", &converted)] {
        let out_dir = tmp.path().join(format!("train-{label}"));
        // A small ACT (random ResNet-18, no pretrained weights: offline) keeps steps cheap;
        // batches of 8 shuffled frames reach every episode.
        let out = Command::new(&train)
            .args([
                "--policy.type=act",
                "--policy.device=cpu",
                "--policy.pretrained_backbone_weights=null",
                "--policy.push_to_hub=false",
                "--policy.dim_model=64",
                "--policy.dim_feedforward=128",
                "--policy.n_encoder_layers=1",
                "--policy.n_decoder_layers=1",
                "--policy.chunk_size=5",
                "--policy.n_action_steps=5",
                "--dataset.repo_id=local/x",
                "--steps=3",
                "--batch_size=8",
                "--num_workers=0",
                "--wandb.enable=false",
                "--save_checkpoint=false",
                "--log_freq=1",
            ])
            .arg(format!("--dataset.root={}", root.display()))
            .arg(format!("--output_dir={}", out_dir.display()))
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_DATASETS_OFFLINE", "1")
            .env("HF_HOME", tmp.path().join("hf"))
            .output()
            .expect("run lerobot-train");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "lerobot-train on the {label} dataset failed:\n{log}"
        );
        let steps = log
            .lines()
            .filter(|l| l.contains(" step:") && l.contains("loss:"))
            .count();
        assert_eq!(
            steps, 3,
            "lerobot-train on the {label} dataset logged {steps} steps:\n{log}"
        );
        assert!(log.contains("End of training"), "{label}:\n{log}");
        eprintln!("lerobot-train: 3 ACT steps on the {label} dataset");
    }
}

/// Issue 11: a dataset whose video drifts from its metadata (made by the old writer's way of
/// joining episodes, `examples/make_drifted_fixture.rs`) fails in LeRobot, and `verify` and our
/// reader name the same episodes.
#[test]
fn drifted_fixture_fails_in_lerobot_where_verify_says() {
    let Some(py) = lerobot_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = fixture("lerobot-v3-drifted-h264");
    let lr = read_every_item_in_lerobot(&py, &tmp.path().join("hf"), None, &[&root]);
    let err = lr[0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("FrameTimestampError"), "LeRobot: {}", lr[0]);
    // LeRobot fails at the first item of episode 1 (index 40): episode 0 is fine.
    assert!(err.starts_with("item 40:"), "{err}");
    let ds = LeRobotDataset::open(&root).unwrap();
    let report = lerobot_dataset::verify::verify(&ds);
    let eps: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    assert_eq!(eps.len(), 2, "{eps:#?}");
    assert!(
        eps[0].contains("episode 1:") && eps[1].contains("episode 2:"),
        "{eps:#?}"
    );
    assert!(ds.get(39).is_ok());
    let e = ds.get(40).unwrap_err().to_string();
    assert!(e.contains("drifts"), "{e}");
}
