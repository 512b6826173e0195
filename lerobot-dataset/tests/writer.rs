//! Datasets written by [`DatasetWriter`] read back exactly, verify, and roll over files like LeRobot.

use lerobot_dataset::synth::{self, SynthConfig};
use lerobot_dataset::video::{mean_rgb, EncoderConfig};
use lerobot_dataset::{stats, FeatureValue, LeRobotDataset};

fn check_roundtrip(ds: &LeRobotDataset, cfg: &SynthConfig, tol: f64) {
    assert_eq!(ds.episodes().len(), cfg.episodes);
    assert_eq!(ds.len(), cfg.episodes * cfg.frames_per_episode);
    let r = lerobot_dataset::verify::verify(ds);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    for ep in 0..cfg.episodes {
        for i in [0, cfg.frames_per_episode / 2, cfg.frames_per_episode - 1] {
            let f = ds.get_episode_frame(ep, i).unwrap();
            assert_eq!(f.task, synth::TASKS[ep % synth::TASKS.len()]);
            assert_eq!(f.timestamp, i as f32 / 30.0);
            assert_eq!(
                f.features["index"],
                FeatureValue::Int(vec![(ep * cfg.frames_per_episode + i) as i64])
            );
            for (c, (name, w, h)) in cfg.cameras.iter().enumerate() {
                let img = &f.images[&format!("observation.images.{name}")];
                assert_eq!(img.dimensions(), (*w, *h));
                let (l, r) = synth::frame_colours(ep, i, c);
                let want: Vec<f64> = (0..3)
                    .map(|k| (f64::from(l[k]) + f64::from(r[k])) / 2.0)
                    .collect();
                let got = mean_rgb(img);
                for k in 0..3 {
                    assert!(
                        (got[k] - want[k]).abs() <= tol,
                        "ep {ep} frame {i} cam {name} ch {k}: {} vs {}",
                        got[k],
                        want[k]
                    );
                }
            }
        }
    }
    // stats.json is the aggregate of the per-episode stats columns.
    let per_ep: Vec<stats::Stats> = ds
        .episodes()
        .iter()
        .map(|e| {
            e.stats
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.clone(),
                        stats::FeatureStats::from_json(&serde_json::json!(v))?,
                    ))
                })
                .collect()
        })
        .collect();
    let agg = stats::aggregate(&per_ep.iter().collect::<Vec<_>>());
    let file = stats::from_json(ds.stats().unwrap());
    assert_eq!(
        agg.keys().collect::<Vec<_>>(),
        file.keys().collect::<Vec<_>>()
    );
    assert_eq!(file["observation.state"].count as usize, ds.len());
}

#[test]
fn synthetic_av1_roundtrip_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        episodes: 3,
        frames_per_episode: 12,
        cameras: vec![("front".into(), 64, 64), ("wrist".into(), 64, 64)],
        ..Default::default()
    };
    let ds = synth::generate(&tmp.path().join("ds"), &cfg).unwrap();
    assert_eq!(
        ds.info()
            .features
            .get("observation.images.front")
            .unwrap()
            .info
            .as_ref()
            .unwrap()["video.codec"],
        "av1"
    );
    check_roundtrip(&ds, &cfg, 4.0);
}

#[test]
fn rollover_into_files_and_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = SynthConfig {
        episodes: 5,
        frames_per_episode: 10,
        cameras: vec![("front".into(), 64, 64)],
        encoder: EncoderConfig {
            vcodec: "libx264".into(),
            preset: None,
            ..Default::default()
        },
        ..Default::default()
    };
    // Tiny size knobs force a new data/video/meta file per episode or two, and new chunks.
    let cams: Vec<(&str, u32, u32)> = vec![("front", 64, 64)];
    let mut dc = lerobot_dataset::DatasetConfig::so100(&cams);
    dc.chunks_size = 2;
    dc.data_files_size_in_mb = 0.004;
    dc.video_files_size_in_mb = 0.003;
    dc.encoder = cfg.encoder.clone();
    let mut w = lerobot_dataset::DatasetWriter::create(&root, dc).unwrap();
    for ep in 0..cfg.episodes {
        for i in 0..cfg.frames_per_episode {
            let mut f = lerobot_dataset::FrameData {
                task: synth::TASKS[ep % 3].into(),
                ..Default::default()
            };
            let v: Vec<f64> = (0..6)
                .map(|j| f64::from((j + i + ep) as f32 * 0.5))
                .collect();
            f.values
                .insert("observation.state".into(), FeatureValue::Float(v.clone()));
            f.values.insert("action".into(), FeatureValue::Float(v));
            let (l, r) = synth::frame_colours(ep, i, 0);
            f.images.insert(
                "observation.images.front".into(),
                image::RgbImage::from_fn(64, 64, |x, _| image::Rgb(if x < 32 { l } else { r })),
            );
            w.add_frame(f).unwrap();
        }
        w.save_episode().unwrap();
    }
    let ds = LeRobotDataset::open(&root).unwrap();
    let chunks: std::collections::BTreeSet<usize> = ds
        .episodes()
        .iter()
        .map(|e| e.data_location.unwrap().0)
        .collect();
    assert!(
        chunks.len() >= 2,
        "data rolled over into several chunks: {:?}",
        ds.episodes()
            .iter()
            .map(|e| e.data_location)
            .collect::<Vec<_>>()
    );
    let vfiles: std::collections::BTreeSet<_> = ds
        .episodes()
        .iter()
        .map(|e| e.videos["observation.images.front"].path.clone())
        .collect();
    assert!(vfiles.len() >= 2);
    check_roundtrip(&ds, &cfg, 6.0);
}
