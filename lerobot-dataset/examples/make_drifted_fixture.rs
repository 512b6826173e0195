//! Makes `tests/fixtures/lerobot-v3-drifted-h264`: a dataset whose metadata drifts from its
//! video exactly as our writer's did before issue 11 was fixed, for `dataset verify` tests.
//!
//! It writes a correct dataset (3 episodes of 40, 29 and 17 frames, one libx264 camera), then
//! rebuilds its video the old way: each episode encoded alone, the clips joined by ffmpeg's
//! concat demuxer with the containers' own (millisecond-rounded) durations. The metadata keeps
//! `from_timestamp = frames before / fps`, so from episode 1 on every frame sits 0.65 ms and
//! more later in the video than the metadata says: LeRobot raises `FrameTimestampError`.
//!
//! Usage: `cargo run -p lerobot-dataset --example make_drifted_fixture -- <out dir>`

use std::path::PathBuf;

use lerobot_dataset::synth::{self, SynthConfig};
use lerobot_dataset::video::{self, ConcatPart, EncoderConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: make_drifted_fixture <out dir>")?,
    );
    if out.exists() {
        return Err(format!("{} exists", out.display()).into());
    }
    let cfg = SynthConfig {
        episode_lengths: vec![40, 29, 17],
        cameras: vec![("front".into(), 64, 64)],
        encoder: EncoderConfig {
            vcodec: "libx264".into(),
            preset: None,
            ..Default::default()
        },
        ..Default::default()
    };
    let ds = synth::generate(&out, &cfg)?;
    let key = "observation.images.front";
    let tmp = tempfile::tempdir()?;
    let mut clips = Vec::new();
    for ep in ds.episodes() {
        let frames = ds.decode_episode(ep.episode_index, key)?;
        let clip = tmp.path().join(format!("ep{}.mp4", ep.episode_index));
        video::encode_frames(&frames, ds.fps(), &cfg.encoder, &clip)?;
        clips.push(clip);
    }
    let parts: Vec<ConcatPart<'_>> = clips
        .iter()
        .map(|path| ConcatPart {
            path,
            duration_s: None,
        })
        .collect();
    let target = out.join(&ds.episodes()[0].videos[key].path);
    let joined = tmp.path().join("joined.mp4");
    video::concat_files(&parts, &joined)?;
    std::fs::copy(&joined, &target)?;
    println!(
        "wrote {} (video rebuilt with drifting episode starts)",
        out.display()
    );
    Ok(())
}
