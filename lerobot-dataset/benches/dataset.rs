//! `cargo xtask bench dataset`: frames/s of our reader vs LeRobot's `LeRobotDataset` (default
//! video backend, through `ZK0_LEROBOT_PYTHON`), reading a dataset 10× the frame cache: one
//! generated dataset per codec (AV1 through libsvtav1, LeRobot's default, and H.264 through
//! libx264), one 640x480 camera each. Both sides read every frame (all features, camera decoded)
//! once in index order (sequential) and once in a seeded shuffled order (random: one training
//! epoch).
//!
//! `cargo bench -p lerobot-dataset --features libav --bench dataset -- [--episodes 4]
//! [--frames 150] [--size 640x480] [--codecs av1,h264] [--cache-ratio 10] [--threads N]
//! [--dir DIR] [--uncached N]`
//!
//! Rather than gigabytes of video, the frame cache is bounded to 1/`--cache-ratio` of the
//! decoded dataset (`set_frame_cache_bytes`), so most reads miss it as on a real dataset of tens
//! of thousands of frames. Each dataset is generated once into DIR (default
//! `$TMPDIR/zk0-bench-dataset-<E>x<F>-<WxH>-<codec>`) and reused. `--uncached N` also times the
//! first N frames of the random order with the cache off (0 skips); `--threads` sets the
//! decoder threads per file (default 1, the reader's; 0: one per core). Without the `libav` feature
//! the reader decodes through the `ffmpeg` CLI, and the output says so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use lerobot_dataset::synth::{generate, SynthConfig};
use lerobot_dataset::video::EncoderConfig;
use lerobot_dataset::LeRobotDataset;
use rand::seq::SliceRandom;
use rand::SeedableRng;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|p| args.get(p + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads `order` through a freshly opened dataset with the frame cache bounded to
/// `cache_bytes` (and `threads` decoder threads, 0: one per core); frames/s and this process's
/// peak RSS while reading (kB; Linux only).
fn ours(dir: &Path, order: &[usize], cache_bytes: usize, threads: usize) -> Res<(f64, u64)> {
    reset_peak_rss();
    let ds = LeRobotDataset::open(dir)?;
    ds.set_frame_cache_bytes(cache_bytes);
    #[cfg(feature = "libav")]
    ds.set_decode_threads(threads);
    #[cfg(not(feature = "libav"))]
    let _ = threads;
    let t = Instant::now();
    for &i in order {
        let f = ds.get(i)?;
        assert_eq!(f.images.len(), 1);
    }
    let fps = order.len() as f64 / t.elapsed().as_secs_f64();
    Ok((fps, zk0_host::peak_rss_kib().unwrap_or(0)))
}

/// Restarts the kernel's peak-RSS count (`VmHWM`) from the current RSS, so that a phase's peak
/// excludes the dataset generation before it.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// LeRobot's frames/s over both orders (`None` when `ZK0_LEROBOT_PYTHON` is unset) and its
/// video backend.
fn lerobot(dir: &Path, sequential: &[usize], random: &[usize]) -> Res<Option<(f64, f64, String)>> {
    let Some(py) = std::env::var_os("ZK0_LEROBOT_PYTHON").filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let scratch = tempfile::tempdir()?;
    let order_path = scratch.path().join("order.json");
    std::fs::write(
        &order_path,
        serde_json::to_vec(&serde_json::json!({"sequential": sequential, "random": random}))?,
    )?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/py/lerobot_read.py");
    let out = Command::new(py)
        .arg(&script)
        .arg(dir)
        .arg(&order_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HOME", scratch.path().join("hf"))
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "LeRobot bench failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))?;
    Ok(Some((
        v["sequential_fps"].as_f64().unwrap_or(f64::NAN),
        v["random_fps"].as_f64().unwrap_or(f64::NAN),
        v["backend"].to_string(),
    )))
}

/// The bench dataset for one codec, generated into `dir` unless it is there already.
fn dataset(dir: &Path, explicit_dir: bool, cfg: &SynthConfig) -> Res<()> {
    let n: usize = cfg.episodes * cfg.frames_per_episode;
    if LeRobotDataset::open(dir).is_ok_and(|d| d.len() == n) {
        return Ok(());
    }
    // Only ever delete our own scratch directory; a --dir holding something else is an error.
    if dir.exists() && explicit_dir {
        return Err(format!(
            "{} exists but is not a {}x{} bench dataset; pass an empty or new --dir",
            dir.display(),
            cfg.episodes,
            cfg.frames_per_episode
        )
        .into());
    }
    let _ = std::fs::remove_dir_all(dir);
    let t = Instant::now();
    generate(dir, cfg)?;
    println!(
        "generated {} in {:.1}s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Res<()> {
    // cargo bench passes `--bench`; ignore it.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let episodes: usize = arg(&args, "--episodes", 4);
    let frames: usize = arg(&args, "--frames", 150);
    let size: String = arg(&args, "--size", "640x480".to_string());
    let codecs: String = arg(&args, "--codecs", "av1,h264".to_string());
    let ratio: usize = arg(&args, "--cache-ratio", 10).max(1);
    let uncached: usize = arg(&args, "--uncached", 0);
    let threads: usize = arg(&args, "--threads", 1);
    let (w, h) = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .ok_or("--size must be WxH")?;
    let base: Option<PathBuf> = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|p| args.get(p + 1))
        .map(PathBuf::from);
    println!(
        "decoder: {}",
        if cfg!(feature = "libav") {
            "in process (feature libav: one open decoder per video file, seek to the keyframe before a miss)"
        } else {
            "ffmpeg CLI (feature libav off: one process per decoder run)"
        }
    );
    let n = episodes * frames;
    let sequential: Vec<usize> = (0..n).collect();
    let mut random = sequential.clone();
    random.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
    let decoded = n * (w * h * 3) as usize;
    let cache = decoded / ratio;
    for codec in codecs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let (label, encoder) = match codec {
            "av1" => (
                "AV1 (libsvtav1, LeRobot's defaults)",
                EncoderConfig::default(),
            ),
            "h264" => (
                "H.264 (libx264, g=2, crf 23)",
                EncoderConfig {
                    vcodec: "libx264".into(),
                    crf: 23,
                    preset: None,
                    ..EncoderConfig::default()
                },
            ),
            other => return Err(format!("--codecs: unknown codec {other:?} (av1, h264)").into()),
        };
        let name = format!("zk0-bench-dataset-{episodes}x{frames}-{w}x{h}-{codec}");
        let dir = match &base {
            Some(b) => b.join(&name),
            None => std::env::temp_dir().join(&name),
        };
        let cfg = SynthConfig {
            episodes,
            frames_per_episode: frames,
            cameras: vec![("front".into(), w, h)],
            encoder,
            ..Default::default()
        };
        dataset(&dir, base.is_some(), &cfg)?;
        println!();
        println!(
            "dataset: {} ({episodes} episodes x {frames} frames, 1 camera {w}x{h} {label}, 30 fps); each pattern reads all {n} frames",
            dir.display()
        );
        println!(
            "frame cache bound: {} MB = 1/{ratio} of the {} MB decoded dataset (set_frame_cache_bytes; the dataset is {ratio}x the cache)",
            cache >> 20,
            decoded >> 20
        );
        let (seq, seq_kib) = ours(&dir, &sequential, cache, threads)?;
        let (rnd, rnd_kib) = ours(&dir, &random, cache, threads)?;
        println!(
            "ours    sequential {seq:8.1} frames/s   random {rnd:8.1} frames/s   (peak RSS while reading: {} / {} MB)",
            seq_kib >> 10,
            rnd_kib >> 10
        );
        if uncached > 0 {
            let k = uncached.min(n);
            let (unc, _) = ours(&dir, &random[..k], 0, threads)?;
            println!("ours    random, frame cache off, {k} frames: {unc:8.1} frames/s");
        }
        match lerobot(&dir, &sequential, &random)? {
            None => println!(
                "LeRobot: skipped (ZK0_LEROBOT_PYTHON unset; `cargo xtask setup --lerobot`, then `eval \"$(cargo xtask env)\"`)"
            ),
            Some((lseq, lrnd, backend)) => {
                println!(
                    "LeRobot sequential {lseq:8.1} frames/s   random {lrnd:8.1} frames/s   (LeRobotDataset, backend {backend})"
                );
                println!(
                    "ratio   sequential {:8.2}x          random {:8.2}x          (target >= 2x)",
                    seq / lseq,
                    rnd / lrnd
                );
            }
        }
    }
    Ok(())
}
