//! Every vendored fixture (written by LeRobot itself) reads back as its `expected.json` says.

use std::path::PathBuf;

use lerobot_dataset::{FeatureValue, LeRobotDataset, Version};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(name)
}

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(&format!("{name}.expected.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn as_f64s(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(as_f64s).collect(),
        Value::Bool(b) => vec![f64::from(u8::from(*b))],
        x => vec![x.as_f64().unwrap()],
    }
}

/// Checks dataset-level facts and every listed frame against the expected file.
fn check_fixture(name: &str, version: Version) {
    let exp = expected(name);
    let ds = LeRobotDataset::open(fixture(name)).unwrap();
    assert_eq!(ds.version(), version);
    assert_eq!(ds.fps() as u64, exp["fps"].as_u64().unwrap());
    assert_eq!(ds.info().robot_type.as_deref(), exp["robot_type"].as_str());
    assert_eq!(
        ds.info().codebase_version,
        exp["codebase_version"].as_str().unwrap()
    );
    assert_eq!(
        ds.episodes().len() as u64,
        exp["total_episodes"].as_u64().unwrap()
    );
    assert_eq!(ds.len() as u64, exp["total_frames"].as_u64().unwrap());
    let lengths: Vec<u64> = ds.episodes().iter().map(|e| e.length as u64).collect();
    assert_eq!(serde_json::json!(lengths), exp["episode_lengths"]);
    let ep_tasks: Vec<&str> = ds.episodes().iter().map(|e| e.tasks[0].as_str()).collect();
    assert_eq!(serde_json::json!(ep_tasks), exp["episode_tasks"]);
    let mut distinct = ds.tasks().to_vec();
    distinct.sort();
    assert_eq!(serde_json::json!(distinct), exp["distinct_tasks"]);
    if let Some(by_index) = exp["tasks_by_index"].as_object() {
        for (i, t) in by_index {
            assert_eq!(ds.tasks()[i.parse::<usize>().unwrap()], t.as_str().unwrap());
        }
    }
    for (key, cam) in exp["cameras"].as_object().unwrap() {
        let f = ds.info().features.get(key).unwrap();
        assert_eq!(
            f.hw(),
            Some((
                cam["height"].as_u64().unwrap() as usize,
                cam["width"].as_u64().unwrap() as usize
            ))
        );
        if let Some(d) = cam["dtype"].as_str() {
            assert_eq!(f.dtype, d);
        }
    }
    // Every file the expected list names exists (and nothing is resolved outside it).
    for f in exp["files"].as_array().unwrap() {
        assert!(fixture(name).join(f.as_str().unwrap()).exists(), "{f}");
    }
    let tol = exp["pixel_mean_tolerance_0_255"].as_f64().unwrap();
    for fr in exp["frames"].as_array().unwrap() {
        let (e, fi) = (
            fr["episode_index"].as_u64().unwrap() as usize,
            fr["frame_index"].as_u64().unwrap() as usize,
        );
        let frame = ds.get_episode_frame(e, fi).unwrap();
        assert_eq!(frame.index as u64, fr["index"].as_u64().unwrap());
        assert_eq!(ds.get(frame.index).unwrap().frame_index, fi);
        assert_eq!(frame.timestamp, fr["timestamp"].as_f64().unwrap() as f32);
        assert_eq!(frame.task, fr["task"].as_str().unwrap());
        if let Some(ti) = fr["task_index"].as_u64() {
            assert_eq!(frame.task_index as u64, ti);
        }
        for (k, v) in fr.as_object().unwrap() {
            let Some(value) = frame.features.get(k) else {
                continue;
            };
            match (value, v) {
                (FeatureValue::Bool(b), Value::Bool(x)) => assert_eq!(b, &vec![*x], "{name} {k}"),
                // float32 data: exact in f32 (serde_json's default float parse may be 1 ulp off in f64).
                _ => assert_eq!(
                    value.to_f32(),
                    as_f64s(v).iter().map(|&x| x as f32).collect::<Vec<_>>(),
                    "{name} e{e} f{fi} {k}"
                ),
            }
        }
        for (cam, mean) in fr["images_mean_rgb_0_255"].as_object().unwrap() {
            let got = lerobot_dataset::video::mean_rgb(&frame.images[cam]);
            for (c, want) in as_f64s(mean).into_iter().enumerate() {
                assert!(
                    (got[c] - want).abs() <= tol,
                    "{name} e{e} f{fi} {cam} channel {c}: {} vs {want}",
                    got[c]
                );
            }
        }
        // Left/right halves (edge fixture): each half is a flat colour in the source.
        for (which, field) in [
            (0, "images_left_half_mean_rgb_0_255"),
            (1, "images_right_half_mean_rgb_0_255"),
        ] {
            let Some(halves) = fr[field].as_object() else {
                continue;
            };
            for (cam, mean) in halves {
                let img = &frame.images[cam];
                let w = img.width() / 2;
                let half = image::imageops::crop_imm(img, which * w, 0, w, img.height()).to_image();
                let got = lerobot_dataset::video::mean_rgb(&half);
                for (c, want) in as_f64s(mean).into_iter().enumerate() {
                    assert!(
                        (got[c] - want).abs() <= tol,
                        "{name} {field} e{e} f{fi} {cam} channel {c}: {} vs {want}",
                        got[c]
                    );
                }
            }
        }
    }
}

#[test]
fn v3_tiny() {
    check_fixture("lerobot-v3-tiny", Version::V30);
}

#[test]
fn v3_edge() {
    check_fixture("lerobot-v3-edge", Version::V30);
}

#[test]
fn v21_tiny() {
    check_fixture("lerobot-v21-tiny", Version::V21);
}

#[test]
fn v3_converted_tiny() {
    check_fixture("lerobot-v3-converted-tiny", Version::V30);
}

fn assert_close(got: &[f64], want: &Value, rel: f64, what: &str) {
    let want = as_f64s(want);
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= rel * w.abs().max(1.0),
            "{what}: {g} vs {w}"
        );
    }
}

/// `stats.json` holds what expected.json says, and aggregating the per-episode stats with
/// LeRobot's formulas reproduces it (min/max/mean/std/count; quantiles are averaged too).
#[test]
fn dataset_stats() {
    use lerobot_dataset::stats;
    for (name, key, feature) in [
        (
            "lerobot-v3-tiny",
            "stats_observation_state",
            "observation.state",
        ),
        (
            "lerobot-v3-converted-tiny",
            "stats_observation_state",
            "observation.state",
        ),
        (
            "lerobot-v3-edge",
            "stats_observation_state",
            "observation.state",
        ),
        ("lerobot-v3-edge", "stats_next_reward", "next.reward"),
        (
            "lerobot-v3-edge",
            "stats_observation_images_side",
            "observation.images.side",
        ),
        (
            "lerobot-v21-tiny",
            "stats_observation_state_aggregated_from_episodes_stats",
            "observation.state",
        ),
    ] {
        let exp = &expected(name)[key];
        let ds = LeRobotDataset::open(fixture(name)).unwrap();
        if let Some(s) = ds.stats() {
            let file = stats::FeatureStats::from_json(&s[feature]).unwrap();
            for (stat, want) in exp.as_object().unwrap() {
                let got = match stat.as_str() {
                    "min" => file.min.clone(),
                    "max" => file.max.clone(),
                    "mean" => file.mean.clone(),
                    "std" => file.std.clone(),
                    "count" => vec![file.count as f64],
                    q => file.quantiles[q].clone(),
                };
                assert_close(
                    &got,
                    want,
                    1e-12,
                    &format!("{name} stats.json {feature} {stat}"),
                );
            }
        }
        let per_episode: Vec<stats::Stats> = ds
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
        let agg = stats::aggregate(&per_episode.iter().collect::<Vec<_>>());
        let a = &agg[feature];
        assert_close(&a.min, &exp["min"], 1e-9, name);
        assert_close(&a.max, &exp["max"], 1e-9, name);
        assert_close(&a.mean, &exp["mean"], 1e-6, name);
        assert_close(&a.std, &exp["std"], 1e-6, name);
        assert_eq!(serde_json::json!([a.count]), exp["count"]);
    }
}

/// The edge fixture's schema and per-episode metadata (multi-file, multi-chunk) resolve exactly.
#[test]
fn edge_episode_metadata() {
    let exp = expected("lerobot-v3-edge");
    let ds = LeRobotDataset::open(fixture("lerobot-v3-edge")).unwrap();
    for (ep, want) in ds
        .episodes()
        .iter()
        .zip(exp["episodes_metadata"].as_array().unwrap())
    {
        assert_eq!(
            ep.episode_index as u64,
            want["episode_index"].as_u64().unwrap()
        );
        assert_eq!(serde_json::json!(ep.tasks), want["tasks"]);
        assert_eq!(ep.length as u64, want["length"].as_u64().unwrap());
        let (dc, df) = ep.data_location.unwrap();
        assert_eq!(
            (dc as u64, df as u64),
            (
                want["data/chunk_index"].as_u64().unwrap(),
                want["data/file_index"].as_u64().unwrap()
            )
        );
        assert_eq!(
            ep.dataset_from_index as u64,
            want["dataset_from_index"].as_u64().unwrap()
        );
        assert_eq!(
            ep.dataset_to_index as u64,
            want["dataset_to_index"].as_u64().unwrap()
        );
        let (mc, mf) = ep.meta_location.unwrap();
        assert_eq!(
            (mc as u64, mf as u64),
            (
                want["meta/episodes/chunk_index"].as_u64().unwrap(),
                want["meta/episodes/file_index"].as_u64().unwrap()
            )
        );
        let v = &ep.videos["observation.images.front"];
        let k = "videos/observation.images.front/";
        assert_eq!(
            v.chunk_index as u64,
            want[format!("{k}chunk_index")].as_u64().unwrap()
        );
        assert_eq!(
            v.file_index as u64,
            want[format!("{k}file_index")].as_u64().unwrap()
        );
        assert_eq!(
            v.from_timestamp,
            want[format!("{k}from_timestamp")].as_f64().unwrap()
        );
        assert_eq!(
            v.to_timestamp,
            want[format!("{k}to_timestamp")].as_f64().unwrap()
        );
        assert!(fixture("lerobot-v3-edge").join(&v.path).exists());
        assert!(fixture("lerobot-v3-edge").join(&ep.data_path).exists());
    }
    // Column names of the data files, in order, as the schema list names them.
    let names: Vec<String> = exp["data_parquet_schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().split(": ").next().unwrap().to_string())
        .collect();
    for ep in ds.episodes() {
        let batch =
            lerobot_dataset::table::read_parquet(&fixture("lerobot-v3-edge").join(&ep.data_path))
                .unwrap();
        let got: Vec<String> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(got, names);
    }
}

/// Our v2.1 → v3.0 conversion reads back as LeRobot's own conversion does
/// (`lerobot-v3-converted-tiny.expected.json`), and its videos are byte-identical stream copies.
#[test]
fn convert_v21_matches_lerobot_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lerobot-v3-converted-tiny");
    lerobot_dataset::convert::convert_v21_to_v30(&fixture("lerobot-v21-tiny"), &out).unwrap();
    let ours = LeRobotDataset::open(&out).unwrap();
    let theirs = LeRobotDataset::open(fixture("lerobot-v3-converted-tiny")).unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours.tasks(), theirs.tasks());
    for i in 0..ours.len() {
        let (a, b) = (ours.get_values(i).unwrap(), theirs.get_values(i).unwrap());
        assert_eq!(a.features, b.features, "frame {i}");
        assert_eq!(a.task, b.task);
    }
    for (ea, eb) in ours.episodes().iter().zip(theirs.episodes()) {
        let (va, vb) = (
            &ea.videos["observation.images.front"],
            &eb.videos["observation.images.front"],
        );
        assert!(
            (va.from_timestamp - vb.from_timestamp).abs() < 1e-9
                && (va.to_timestamp - vb.to_timestamp).abs() < 1e-9
        );
    }
    let exp = expected("lerobot-v3-converted-tiny");
    for fr in exp["frames"].as_array().unwrap() {
        let f = ours
            .get_episode_frame(
                fr["episode_index"].as_u64().unwrap() as usize,
                fr["frame_index"].as_u64().unwrap() as usize,
            )
            .unwrap();
        let got = lerobot_dataset::video::mean_rgb(&f.images["observation.images.front"]);
        let want = as_f64s(&fr["images_mean_rgb_0_255"]["observation.images.front"]);
        for c in 0..3 {
            assert!(
                (got[c] - want[c]).abs() <= 1e-3,
                "stream copy decodes like LeRobot's converted file: {got:?} vs {want:?}"
            );
        }
    }
    let st = lerobot_dataset::stats::FeatureStats::from_json(
        &ours.stats().unwrap()["observation.state"],
    )
    .unwrap();
    assert_close(
        &st.mean,
        &exp["stats_observation_state"]["mean"],
        1e-6,
        "converted stats mean",
    );
    assert_close(
        &st.std,
        &exp["stats_observation_state"]["std"],
        1e-6,
        "converted stats std",
    );
    assert!(lerobot_dataset::verify::verify(&ours).problems.is_empty());
}
