//! `zk0-agent dataset …`: inspect LeRobot datasets (v3.0 and v2.1) on this host.
//!
//! Thin layer over the `lerobot-dataset` crate: parse arguments, call the reader, print text or
//! JSON. Errors keep the crate's file/episode naming and add the command's context.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use lerobot_dataset::LeRobotDataset;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

/// A dataset directory, or a Hub dataset resolved through hf-hub's cache.
#[derive(ClapArgs, Debug)]
struct Source {
    /// Dataset directory (v3.0 or v2.1).
    #[arg(required_unless_present = "repo_id")]
    dir: Option<PathBuf>,
    /// Hugging Face Hub dataset `user/name` (downloaded into the hf-hub cache; HF_HUB_OFFLINE=1
    /// uses the cache only).
    #[arg(long, conflicts_with = "dir")]
    repo_id: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long, requires = "repo_id")]
    revision: Option<String>,
}

impl Source {
    fn path(&self) -> anyhow::Result<PathBuf> {
        match (&self.dir, &self.repo_id) {
            (Some(d), _) => Ok(d.clone()),
            (None, Some(r)) => lerobot_dataset::hub::resolve(r, self.revision.as_deref())
                .with_context(|| format!("resolving {r} on the Hub")),
            (None, None) => anyhow::bail!("give a dataset directory or --repo-id"),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Summary: episodes, frames, fps, robot type, features, tasks, files.
    Info {
        #[command(flatten)]
        src: Source,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One frame: every non-camera feature, and each camera's mean RGB (0–255).
    Show {
        #[command(flatten)]
        src: Source,
        #[arg(long)]
        episode: usize,
        #[arg(long)]
        frame: usize,
        /// Print JSON (the default output is JSON too, pretty-printed).
        #[arg(long)]
        json: bool,
    },
    /// Check indices, lengths, timestamps, tasks, video files (ffprobe) and stats; exits non-zero
    /// on any problem, listing each with its file and episode.
    Verify {
        #[command(flatten)]
        src: Source,
    },
    /// Convert a v2.1 dataset to a new v3.0 dataset (videos stream-copied, not re-encoded).
    Convert { src: PathBuf, dst: PathBuf },
    /// Generate a synthetic SO-100-like v3.0 dataset (demo, benchmarks, tests).
    Synth {
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        episodes: usize,
        #[arg(long, default_value_t = 30)]
        frames: usize,
        /// Video cameras, as NAME:WIDTHxHEIGHT (repeatable).
        #[arg(long = "camera", default_value = "front:64x64")]
        cameras: Vec<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// ffmpeg video encoder (LeRobot's default: libsvtav1).
        #[arg(long, default_value = "libsvtav1")]
        vcodec: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Info { src, json } => info(&src.path()?, json),
        Cmd::Show {
            src,
            episode,
            frame,
            json,
        } => show(&src.path()?, episode, frame, json),
        Cmd::Verify { src } => verify(&src.path()?),
        Cmd::Synth {
            dir,
            episodes,
            frames,
            cameras,
            seed,
            vcodec,
        } => synth(&dir, episodes, frames, &cameras, seed, vcodec),
        Cmd::Convert { src, dst } => {
            let ds = lerobot_dataset::convert::convert_v21_to_v30(&src, &dst)
                .with_context(|| format!("converting {} to {}", src.display(), dst.display()))?;
            println!(
                "converted {} → {} ({} episodes, {} frames, v3.0)",
                src.display(),
                dst.display(),
                ds.episodes().len(),
                ds.len()
            );
            Ok(())
        }
    }
}

fn open(dir: &Path) -> anyhow::Result<LeRobotDataset> {
    LeRobotDataset::open(dir).with_context(|| format!("opening dataset {}", dir.display()))
}

/// Every file under the dataset root, relative and sorted.
fn list_files(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn info(dir: &Path, json: bool) -> anyhow::Result<()> {
    let ds = open(dir)?;
    let i = ds.info();
    let files = list_files(dir)?;
    let features: serde_json::Map<String, serde_json::Value> = i
        .features
        .iter()
        .map(|(k, f)| {
            (
                k.to_string(),
                serde_json::json!({"dtype": f.dtype, "shape": f.shape, "names": f.names}),
            )
        })
        .collect();
    let episodes: Vec<serde_json::Value> = ds
        .episodes()
        .iter()
        .map(|e| {
            let videos: serde_json::Map<String, serde_json::Value> = e
                .videos
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!({"path": v.path, "from_timestamp": v.from_timestamp, "to_timestamp": v.to_timestamp})))
                .collect();
            serde_json::json!({"episode_index": e.episode_index, "length": e.length, "tasks": e.tasks,
                "dataset_from_index": e.dataset_from_index, "dataset_to_index": e.dataset_to_index,
                "data_path": e.data_path, "videos": videos})
        })
        .collect();
    if json {
        let out = serde_json::json!({
            "root": dir, "codebase_version": i.codebase_version, "fps": i.fps, "robot_type": i.robot_type,
            "total_episodes": ds.episodes().len(), "total_frames": ds.len(), "total_tasks": ds.tasks().len(),
            "tasks": ds.tasks(), "cameras": ds.camera_keys(), "features": features, "episodes": episodes, "files": files,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("dataset     {}", dir.display());
    println!("version     {}", i.codebase_version);
    println!("robot type  {}", i.robot_type.as_deref().unwrap_or("-"));
    println!("fps         {}", i.fps);
    println!("episodes    {}", ds.episodes().len());
    println!("frames      {}", ds.len());
    println!("features");
    for (k, f) in i.features.iter() {
        println!("  {k:<32} {:<8} {:?}", f.dtype, f.shape);
    }
    println!("tasks");
    for (n, t) in ds.tasks().iter().enumerate() {
        println!("  {n:>3}  {t}");
    }
    println!("episodes (index: length, tasks)");
    for e in ds.episodes() {
        println!(
            "  {:>5}: {:>6}  {}",
            e.episode_index,
            e.length,
            e.tasks.join(" | ")
        );
    }
    println!("files ({})", files.len());
    for f in &files {
        println!("  {f}");
    }
    Ok(())
}

fn show(dir: &Path, episode: usize, frame: usize, json: bool) -> anyhow::Result<()> {
    let ds = open(dir)?;
    let f = ds.get_episode_frame(episode, frame).with_context(|| {
        format!(
            "reading episode {episode} frame {frame} of {}",
            dir.display()
        )
    })?;
    let v = f.to_show_json();
    println!(
        "{}",
        if json {
            serde_json::to_string(&v)?
        } else {
            serde_json::to_string_pretty(&v)?
        }
    );
    Ok(())
}

fn verify(dir: &Path) -> anyhow::Result<()> {
    let ds = open(dir)?;
    let r = lerobot_dataset::verify::verify(&ds);
    for p in &r.problems {
        eprintln!("problem: {p}");
    }
    if !r.problems.is_empty() {
        anyhow::bail!("{}: {} problem(s) found", dir.display(), r.problems.len());
    }
    println!(
        "ok: {} ({} episodes, {} frames, {} data files, {} video files)",
        dir.display(),
        r.episodes,
        r.frames,
        r.data_files,
        r.video_files
    );
    Ok(())
}

fn synth(
    dir: &Path,
    episodes: usize,
    frames: usize,
    cameras: &[String],
    seed: u64,
    vcodec: String,
) -> anyhow::Result<()> {
    use lerobot_dataset::synth::{generate, SynthConfig};
    let cameras = cameras
        .iter()
        .map(|c| {
            let (name, size) = c
                .split_once(':')
                .context("camera must be NAME:WIDTHxHEIGHT")?;
            let (w, h) = size
                .split_once('x')
                .context("camera size must be WIDTHxHEIGHT")?;
            Ok((name.to_string(), w.parse()?, h.parse()?))
        })
        .collect::<anyhow::Result<Vec<(String, u32, u32)>>>()?;
    let preset = (vcodec == "libsvtav1").then_some(12);
    let encoder = lerobot_dataset::video::EncoderConfig {
        vcodec,
        preset,
        ..Default::default()
    };
    let cfg = SynthConfig {
        episodes,
        frames_per_episode: frames,
        cameras,
        seed,
        encoder,
        ..Default::default()
    };
    let ds = generate(dir, &cfg).with_context(|| format!("generating {}", dir.display()))?;
    println!(
        "wrote {} ({} episodes, {} frames)",
        dir.display(),
        ds.episodes().len(),
        ds.len()
    );
    Ok(())
}
