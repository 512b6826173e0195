//! Reader throughput on a generated dataset: sequential (one decoder pass per episode) and
//! random access (through the reader's block cache). `cargo xtask bench dataset` is the fuller
//! benchmark, against LeRobot.
//!
//! `cargo run --release -p lerobot-dataset --example read_bench -- [DIR] [EPISODES] [FRAMES] [WxH]`
//! generates DIR (default: a temporary directory) if it holds no dataset yet.

use std::time::Instant;

use lerobot_dataset::synth::{generate, SynthConfig};
use lerobot_dataset::LeRobotDataset;
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = tempfile::tempdir()?;
    let dir = args
        .first()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("bench"));
    let episodes = args.get(1).map_or(Ok(4), |s| s.parse())?;
    let frames = args.get(2).map_or(Ok(60), |s| s.parse())?;
    let (w, h) = args
        .get(3)
        .and_then(|s| s.split_once('x'))
        .map_or((640, 480), |(w, h)| {
            (w.parse().unwrap_or(640), h.parse().unwrap_or(480))
        });
    if !dir.join("meta/info.json").exists() {
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
            "generated {episodes}x{frames} frames at {w}x{h} in {:.2}s",
            t.elapsed().as_secs_f64()
        );
    }
    let ds = LeRobotDataset::open(&dir)?;
    let n = ds.len();

    let t = Instant::now();
    let mut count = 0;
    for e in 0..ds.episodes().len() {
        count += ds.decode_episode(e, "observation.images.front")?.len();
        for i in ds.episodes()[e].dataset_from_index..ds.episodes()[e].dataset_to_index {
            ds.get_values(i)?;
        }
    }
    let seq = count as f64 / t.elapsed().as_secs_f64();

    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
    idx.truncate(100.min(n));
    let t = Instant::now();
    for &i in &idx {
        ds.get(i)?;
    }
    let rnd = idx.len() as f64 / t.elapsed().as_secs_f64();
    println!(
        "{n} frames, 1 camera {w}x{h}: sequential {seq:.1} frames/s, random {rnd:.1} frames/s"
    );
    Ok(())
}
