//! Synthetic SO-100-like datasets for demos and tests: smooth joint trajectories (seeded),
//! actions leading the state slightly, and camera frames whose two halves are flat colours that
//! drift with time (so decoded-pixel checks have a known answer).

use std::path::Path;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::reader::LeRobotDataset;
use crate::table::FeatureValue;
use crate::video::EncoderConfig;
use crate::writer::{DatasetConfig, DatasetWriter, FrameData};

/// Tasks cycled through by the generated episodes.
pub const TASKS: [&str; 3] = [
    "Pick up the red cube.",
    "Put the cube in the bowl.",
    "Open the drawer.",
];

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub episodes: usize,
    pub frames_per_episode: usize,
    /// `(name, width, height)`: one video camera `observation.images.<name>` each.
    pub cameras: Vec<(String, u32, u32)>,
    pub seed: u64,
    pub fps: u32,
    pub encoder: EncoderConfig,
    /// Each episode's length, overriding `episodes` × `frames_per_episode` when not empty.
    pub episode_lengths: Vec<usize>,
    /// LeRobot's file-size knobs (`None`: LeRobot's defaults); small values force rollovers.
    pub video_files_size_in_mb: Option<f64>,
    pub data_files_size_in_mb: Option<f64>,
    pub chunks_size: Option<usize>,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            episodes: 3,
            frames_per_episode: 30,
            cameras: vec![("front".into(), 64, 64)],
            seed: 0,
            fps: 30,
            encoder: EncoderConfig::default(),
            episode_lengths: Vec::new(),
            video_files_size_in_mb: None,
            data_files_size_in_mb: None,
            chunks_size: None,
        }
    }
}

/// The source colours `(left, right)` of camera `cam` at frame `i` of episode `ep`.
pub fn frame_colours(ep: usize, i: usize, cam: usize) -> ([u8; 3], [u8; 3]) {
    let b = |x: usize| (x % 200 + 28) as u8;
    (
        [b(40 + 7 * i + 50 * cam), b(100 + 30 * ep), b(60 + 3 * i)],
        [b(150 + 5 * i), b(30 + 60 * cam + 4 * i), b(90 + 20 * ep)],
    )
}

/// Writes a synthetic dataset to `root` and opens it.
pub fn generate(root: &Path, cfg: &SynthConfig) -> Result<LeRobotDataset> {
    let cams: Vec<(&str, u32, u32)> = cfg
        .cameras
        .iter()
        .map(|(n, w, h)| (n.as_str(), *w, *h))
        .collect();
    let mut dc = DatasetConfig::so100(&cams);
    dc.fps = cfg.fps;
    dc.encoder = cfg.encoder.clone();
    dc.video_files_size_in_mb = cfg
        .video_files_size_in_mb
        .unwrap_or(dc.video_files_size_in_mb);
    dc.data_files_size_in_mb = cfg
        .data_files_size_in_mb
        .unwrap_or(dc.data_files_size_in_mb);
    dc.chunks_size = cfg.chunks_size.unwrap_or(dc.chunks_size);
    let mut w = DatasetWriter::create(root, dc)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let lengths = if cfg.episode_lengths.is_empty() {
        vec![cfg.frames_per_episode; cfg.episodes]
    } else {
        cfg.episode_lengths.clone()
    };
    for (ep, &length) in lengths.iter().enumerate() {
        let phase: Vec<f64> = (0..6)
            .map(|_| rng.gen_range(0.0..std::f64::consts::TAU))
            .collect();
        let amp: Vec<f64> = (0..6).map(|_| rng.gen_range(10.0..40.0)).collect();
        for i in 0..length {
            let t = i as f64 / f64::from(cfg.fps);
            let joint = |lead: f64| -> Vec<f64> {
                (0..6)
                    .map(|j| f64::from((amp[j] * (t * 2.0 + lead + phase[j]).sin()) as f32))
                    .collect()
            };
            let mut f = FrameData {
                task: TASKS[ep % TASKS.len()].to_string(),
                ..Default::default()
            };
            f.values
                .insert("observation.state".into(), FeatureValue::Float(joint(0.0)));
            f.values
                .insert("action".into(), FeatureValue::Float(joint(0.1)));
            for (c, (name, wd, ht)) in cfg.cameras.iter().enumerate() {
                let (l, r) = frame_colours(ep, i, c);
                let img = RgbImage::from_fn(*wd, *ht, |x, _| Rgb(if x < wd / 2 { l } else { r }));
                f.images.insert(format!("observation.images.{name}"), img);
            }
            w.add_frame(f)?;
        }
        w.save_episode()?;
    }
    LeRobotDataset::open(root)
}
