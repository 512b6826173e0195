//! `cargo xtask bench dataset`: frames/s of our reader vs LeRobot's `LeRobotDataset` (default
//! video backend, through `ZK0_LEROBOT_PYTHON`) on one generated dataset with one 640x480 AV1
//! camera. Both read every frame (all features, camera decoded) once in index order
//! (sequential) and once in a seeded shuffled order (random: one training epoch).
//!
//! `cargo bench -p lerobot-dataset --bench dataset -- [--episodes 4] [--frames 150]
//! [--size 640x480] [--dir DIR] [--uncached N]`
//!
//! The dataset is generated once into DIR (default `$TMPDIR/zk0-bench-dataset-<E>x<F>-<WxH>`)
//! and reused. `--uncached N` also times the first N frames of the random order with the frame
//! cache off (one ffmpeg run per frame: the reader before the cache) and with the cache bounded to
//! a quarter of the decoded dataset (a dataset larger than the cache); 0 skips both.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use lerobot_dataset::synth::{generate, SynthConfig};
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

/// Reads `order` through a freshly opened dataset (frame cache bound `cache_bytes`, `None` for
/// the default); frames/s.
fn ours(dir: &PathBuf, order: &[usize], cache_bytes: Option<usize>) -> Res<f64> {
    let ds = LeRobotDataset::open(dir)?;
    if let Some(b) = cache_bytes {
        ds.set_frame_cache_bytes(b);
    }
    let t = Instant::now();
    for &i in order {
        let f = ds.get(i)?;
        assert_eq!(f.images.len(), 1);
    }
    Ok(order.len() as f64 / t.elapsed().as_secs_f64())
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
    let uncached: usize = arg(&args, "--uncached", 120);
    let (w, h) = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .ok_or("--size must be WxH")?;
    let dir: PathBuf = arg(
        &args,
        "--dir",
        std::env::temp_dir().join(format!("zk0-bench-dataset-{episodes}x{frames}-{w}x{h}")),
    );
    if LeRobotDataset::open(&dir).map_or(true, |d| d.len() != episodes * frames) {
        // Only ever delete our own scratch directory; a --dir holding something else is an error.
        if dir.exists() && args.iter().any(|a| a == "--dir") {
            return Err(format!(
                "{} exists but is not a {episodes}x{frames} bench dataset; pass an empty or new --dir",
                dir.display()
            )
            .into());
        }
        let _ = std::fs::remove_dir_all(&dir);
        let t = Instant::now();
        generate(
            &dir,
            &SynthConfig {
                episodes,
                frames_per_episode: frames,
                cameras: vec![("front".into(), w, h)],
                ..Default::default()
            },
        )?;
        println!(
            "generated {} in {:.1}s",
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let n = episodes * frames;
    let sequential: Vec<usize> = (0..n).collect();
    let mut random = sequential.clone();
    random.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
    println!(
        "dataset: {} ({episodes} episodes x {frames} frames, 1 camera {w}x{h} AV1, 30 fps); each pattern reads all {n} frames",
        dir.display()
    );

    let seq = ours(&dir, &sequential, None)?;
    let rnd = ours(&dir, &random, None)?;
    println!("ours    sequential {seq:8.1} frames/s   random {rnd:8.1} frames/s   (frame cache: default bound, whole dataset fits)");
    if uncached > 0 {
        let k = uncached.min(n);
        let unc = ours(&dir, &random[..k], Some(0))?;
        println!("ours    random, frame cache off (one ffmpeg run per frame), {k} frames: {unc:8.1} frames/s");
        let quarter = n * (w * h * 3) as usize / 4;
        let small = ours(&dir, &random[..k], Some(quarter))?;
        println!(
            "ours    random, frame cache {} MB (1/4 of the decoded dataset), {k} frames: {small:8.1} frames/s",
            quarter >> 20
        );
    }

    let Some(py) = std::env::var_os("ZK0_LEROBOT_PYTHON").filter(|p| !p.is_empty()) else {
        println!(
            "LeRobot: skipped (ZK0_LEROBOT_PYTHON unset; `cargo xtask setup --lerobot`, then `eval \"$(cargo xtask env)\"`)"
        );
        return Ok(());
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
        .arg(&dir)
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
    let (lseq, lrnd) = (
        v["sequential_fps"].as_f64().unwrap_or(f64::NAN),
        v["random_fps"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "LeRobot sequential {lseq:8.1} frames/s   random {lrnd:8.1} frames/s   (LeRobotDataset, backend {})",
        v["backend"]
    );
    println!(
        "ratio   sequential {:8.2}x          random {:8.2}x          (target >= 1.5x)",
        seq / lseq,
        rnd / lrnd
    );
    Ok(())
}
