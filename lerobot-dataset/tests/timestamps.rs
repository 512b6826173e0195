//! Issue 11 without LeRobot: episode spans our writer records equal the frames' presentation
//! times in the video, for awkward lengths, codecs and rollovers; `verify` flags a dataset
//! whose video drifts from its metadata by episode and camera.

use std::path::{Path, PathBuf};

use lerobot_dataset::synth::{self, SynthConfig};
use lerobot_dataset::verify::{verify, TOLERANCE_S};
use lerobot_dataset::video::{self, EncoderConfig};
use lerobot_dataset::LeRobotDataset;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Every episode's first frame is in its file at `from_timestamp`, its frames `1/fps` apart.
fn assert_spans_are_frame_times(ds: &LeRobotDataset) {
    let fps = f64::from(ds.fps());
    for ep in ds.episodes() {
        for (key, span) in &ep.videos {
            let times = video::frame_times(&ds.root().join(&span.path), None).unwrap();
            let (j, d) = video::nearest(&times, span.from_timestamp).unwrap();
            assert!(d <= TOLERANCE_S, "episode {} {key}: {d}", ep.episode_index);
            for i in 0..ep.length {
                let want = span.from_timestamp + i as f64 / fps;
                assert!(
                    (times[j + i] - want).abs() <= TOLERANCE_S,
                    "episode {} {key} frame {i}: at {}, metadata says {want}",
                    ep.episode_index,
                    times[j + i]
                );
            }
            assert!(
                (span.to_timestamp - span.from_timestamp - ep.length as f64 / fps).abs() < 1e-9,
                "episode {} {key}: span",
                ep.episode_index
            );
        }
    }
}

#[test]
fn spans_equal_frame_times_for_awkward_lengths_and_codecs() {
    // 29 and 17 frames of AV1 and 40 of H.264 are not whole numbers of mp4's millisecond
    // movie timescale: the lengths that drifted before.
    for (vcodec, lengths) in [
        ("libsvtav1", vec![29, 17, 1, 29, 30]),
        ("libx264", vec![40, 17, 3, 41]),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            episode_lengths: lengths.clone(),
            cameras: vec![("front".into(), 96, 64)],
            encoder: EncoderConfig {
                vcodec: vcodec.into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let ds = synth::generate(&tmp.path().join("ds"), &cfg).unwrap();
        assert_eq!(ds.episodes().len(), lengths.len());
        assert_spans_are_frame_times(&ds);
        let r = verify(&ds);
        assert!(r.problems.is_empty(), "{vcodec}: {:?}", r.problems);
        // Our reader's timestamp check passes on every frame.
        for i in 0..ds.len() {
            ds.get(i).unwrap();
        }
    }
}

#[test]
fn spans_stay_exact_across_file_and_chunk_rollovers() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        episode_lengths: vec![29, 17, 23, 40, 11, 29, 5],
        cameras: vec![("front".into(), 96, 64), ("wrist".into(), 64, 64)],
        video_files_size_in_mb: Some(0.006),
        chunks_size: Some(2),
        ..Default::default()
    };
    let ds = synth::generate(&tmp.path().join("ds"), &cfg).unwrap();
    let files: std::collections::BTreeSet<_> = ds
        .episodes()
        .iter()
        .map(|e| e.videos["observation.images.front"].path.clone())
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    assert!(files.len() < ds.episodes().len(), "{files:?}");
    assert_spans_are_frame_times(&ds);
    assert!(verify(&ds).problems.is_empty());
}

#[test]
fn verify_flags_the_drifted_fixture_by_episode_and_camera() {
    let ds = LeRobotDataset::open(fixture("lerobot-v3-drifted-h264")).unwrap();
    let problems: Vec<String> = verify(&ds)
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    for (p, ep) in problems.iter().zip([1, 2]) {
        assert!(
            p.contains(&format!("episode {ep}: observation.images.front: frame 0 ")),
            "{p}"
        );
    }
    // Episode 0 reads; the reader refuses the first drifted frame as LeRobot does.
    assert!(ds.get(0).is_ok() && ds.get(39).is_ok());
    let e = ds.get(40).unwrap_err().to_string();
    assert!(
        e.contains("observation.images.front") && e.contains("drifts"),
        "{e}"
    );
}
