//! The in-process decoder (feature `libav`) returns exactly the frames and pixels of the
//! `ffmpeg` CLI path, on AV1 (LeRobot's default) and H.264 clips from our own encoder, in any
//! access order; bad files give errors, not panics.

use std::path::Path;

use image::{Rgb, RgbImage};
use lerobot_dataset::libav::Decoder;
use lerobot_dataset::synth::{self, SynthConfig};
use lerobot_dataset::video::{self, EncoderConfig, FrameRun};
use lerobot_dataset::{DatasetError, LeRobotDataset};

const FPS: u32 = 30;
const W: usize = 96;
const H: usize = 64;

/// Textured, moving frames: gradients in every channel and a sliding bar, so chroma
/// upsampling and matrix differences would change pixels.
fn frames(n: usize) -> Vec<RgbImage> {
    (0..n)
        .map(|i| {
            RgbImage::from_fn(W as u32, H as u32, |x, y| {
                let bar = (x as usize + 3 * i) % 40 < 8;
                Rgb([
                    (x * 2 + i as u32 * 5) as u8,
                    if bar { 230 } else { (y * 3) as u8 },
                    ((x + y) * 2 + i as u32 * 3) as u8,
                ])
            })
        })
        .collect()
}

fn encoder(vcodec: &str) -> EncoderConfig {
    match vcodec {
        "libx264" => EncoderConfig {
            vcodec: "libx264".into(),
            preset: None,
            crf: 23,
            ..EncoderConfig::default()
        },
        _ => EncoderConfig::default(),
    }
}

fn cli(path: &Path, t: f64, count: usize) -> Vec<RgbImage> {
    video::decode_frames(path, &run(t, count, 0)).unwrap()
}

fn run(time_s: f64, count: usize, episode: usize) -> FrameRun {
    FrameRun {
        time_s,
        fps: f64::from(FPS),
        count,
        width: W,
        height: H,
        episode,
    }
}

fn assert_same(a: &[RgbImage], b: &[RgbImage], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: frame count");
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        let diff = x
            .as_raw()
            .iter()
            .zip(y.as_raw())
            .filter(|(p, q)| p != q)
            .count();
        assert_eq!(diff, 0, "{what}: frame {k}: {diff} bytes differ");
    }
}

#[test]
fn same_frames_as_the_cli_on_av1_and_h264() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 45;
    for vcodec in ["libsvtav1", "libx264"] {
        let path = tmp.path().join(format!("{vcodec}.mp4"));
        video::encode_frames(&frames(n), FPS, &encoder(vcodec), &path).unwrap();
        let fps = f64::from(FPS);
        // First and last frame, timestamps between frames (nearest: 7, then 9), a run across
        // the middle, backwards jumps (seek) and the next frame (decode forward).
        let queries: &[(f64, usize)] = &[
            (0.0, 1),
            ((n - 1) as f64 / fps, 1),
            (7.3 / fps, 1),
            (8.7 / fps, 1),
            (20.0 / fps, 6),
            (26.0 / fps, 1),
            (3.0 / fps, 2),
            (5.0 / fps, 1),
            (40.0 / fps, 5),
        ];
        for threads in [0, 1] {
            let mut dec = Decoder::open(&path, threads).unwrap();
            for &(t, count) in queries {
                let what = format!("{vcodec} threads={threads} t={t:.4} count={count}");
                let ours = dec.frames(&run(t, count, 0)).unwrap();
                assert_same(&ours, &cli(&path, t, count), &what);
            }
        }
        // Not a copy of the first frame everywhere: the clip moves.
        assert!(cli(&path, 0.0, 1)[0] != cli(&path, 30.0 / fps, 1)[0]);
    }
}

#[test]
fn reader_matches_the_cli_across_episodes() {
    let tmp = tempfile::tempdir().unwrap();
    for vcodec in ["libsvtav1", "libx264"] {
        let root = tmp.path().join(vcodec);
        let ds = synth::generate(
            &root,
            &SynthConfig {
                episode_lengths: vec![20, 33, 17],
                cameras: vec![("front".into(), 96, 64)],
                encoder: encoder(vcodec),
                ..Default::default()
            },
        )
        .unwrap();
        let key = "observation.images.front";
        // Each episode's first and last frame, then the rest out of order.
        let mut order = vec![0, 19, 20, 52, 53, 69, 30, 31, 5, 60, 45, 46, 47, 2];
        order.extend((0..ds.len()).rev());
        for i in order {
            let f = ds.get(i).unwrap();
            let ep = ds.episode(f.episode_index).unwrap();
            let span = &ep.videos[key];
            let t = span.from_timestamp + f64::from(f.timestamp);
            let want =
                video::decode_frames(&root.join(&span.path), &run(t, 1, f.episode_index)).unwrap();
            assert_same(
                std::slice::from_ref(&f.images[key]),
                &want,
                &format!("{vcodec} index {i}"),
            );
        }
    }
}

#[test]
fn truncated_or_garbage_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("clip.mp4");
    video::encode_frames(&frames(60), FPS, &encoder("libx264"), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // faststart: the index comes first, so the cut file still opens and lists every frame.
    let cut = tmp.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let mut dec = Decoder::open(&cut, 0).unwrap();
    let err = dec.frames(&run(55.0 / 30.0, 3, 4)).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DatasetError::Video { episode: 4, .. }) && msg.contains("cut.mp4"),
        "{msg}"
    );
    // Asking for the wrong size is an error too, not a garbled image.
    let mut dec = Decoder::open(&path, 0).unwrap();
    let wide = FrameRun {
        width: W + 2,
        ..run(0.0, 1, 0)
    };
    let msg = dec.frames(&wide).unwrap_err().to_string();
    assert!(msg.contains("the metadata says 98x64"), "{msg}");

    let junk = tmp.path().join("junk.mp4");
    std::fs::write(&junk, b"not a video at all").unwrap();
    let msg = Decoder::open(&junk, 0).unwrap_err().to_string();
    assert!(
        msg.contains("junk.mp4") && msg.contains("cannot open"),
        "{msg}"
    );
    let msg = Decoder::open(&tmp.path().join("missing.mp4"), 0)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn reader_reports_a_truncated_video() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let ds = synth::generate(
        &root,
        &SynthConfig {
            episodes: 2,
            frames_per_episode: 40,
            ..Default::default()
        },
    )
    .unwrap();
    let span = ds.episode(1).unwrap().videos["observation.images.front"].clone();
    drop(ds);
    let file = root.join(&span.path);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let ds = LeRobotDataset::open(&root).unwrap();
    let err = ds.get(79).unwrap_err();
    assert!(
        matches!(err, DatasetError::Video { episode: 1, .. }),
        "{err}"
    );
}
