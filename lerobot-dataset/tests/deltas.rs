//! Delta-timestamp queries (action chunks, observation history) and the prefetching loader.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use lerobot_dataset::{LeRobotDataset, Prefetcher};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(name)
}

/// LeRobot semantics: index + round(d·fps) clamped into [episode start, end), pad flag where clamped.
#[test]
fn action_chunk_pads_at_episode_edges() {
    let ds = LeRobotDataset::open(fixture("lerobot-v3-edge")).unwrap();
    let fps = f64::from(ds.fps());
    // Episode 1 covers global indices [21, 55); ask at its second-to-last frame for 4 future actions
    // and one past observation.
    let idx = 53;
    let deltas = BTreeMap::from([
        (
            "action".to_string(),
            (0..4).map(|k| k as f64 / fps).collect::<Vec<_>>(),
        ),
        ("observation.state".to_string(), vec![-1.0 / fps, 0.0]),
        (
            "observation.images.front".to_string(),
            vec![-1.0 / fps, 0.0],
        ),
    ]);
    let s = ds.get_deltas(idx, &deltas).unwrap();
    assert_eq!(s.is_pad["action_is_pad"], [false, false, true, true]);
    assert_eq!(s.is_pad["observation.state_is_pad"], [false, false]);
    let actions = &s.values["action"];
    assert_eq!(actions[0], ds.get_values(53).unwrap().features["action"]);
    assert_eq!(actions[1], ds.get_values(54).unwrap().features["action"]);
    assert_eq!(
        actions[2], actions[1],
        "clamped to the last frame of the episode"
    );
    assert_eq!(actions[3], actions[1]);
    assert_eq!(
        s.values["observation.state"][0],
        ds.get_values(52).unwrap().features["observation.state"]
    );
    let imgs = &s.images["observation.images.front"];
    assert_eq!(imgs.len(), 2);
    assert_eq!(
        imgs[1],
        ds.get(53).unwrap().images["observation.images.front"]
    );
    assert_eq!(
        imgs[0],
        ds.get(52).unwrap().images["observation.images.front"]
    );
    // The side camera (not queried) comes with the frame itself.
    assert!(s.frame.images.contains_key("observation.images.side"));

    // At an episode start, past offsets pad and clamp to the first frame.
    let s = ds
        .get_deltas(
            21,
            &BTreeMap::from([(
                "observation.state".to_string(),
                vec![-2.0 / fps, -1.0 / fps, 0.0],
            )]),
        )
        .unwrap();
    assert_eq!(s.is_pad["observation.state_is_pad"], [true, true, false]);
    let v = &s.values["observation.state"];
    assert!(v[0] == v[2] && v[1] == v[2]);
}

#[test]
fn prefetcher_yields_batches_in_order() {
    let ds = Arc::new(LeRobotDataset::open(fixture("lerobot-v3-tiny")).unwrap());
    let deltas = BTreeMap::from([("action".to_string(), vec![0.0, 1.0 / 30.0])]);
    let indices: Vec<usize> = (0..ds.len()).rev().collect();
    let batches: Vec<_> = Prefetcher::new(ds.clone(), indices.clone(), 16, deltas.clone(), 2)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches.len(), ds.len().div_ceil(16));
    let flat: Vec<usize> = batches.iter().flatten().map(|s| s.frame.index).collect();
    assert_eq!(flat, indices);
    assert!(batches
        .iter()
        .flatten()
        .all(|s| s.frame.images.contains_key("observation.images.front")));
    // Dropping early stops the worker without hanging.
    let mut it = Prefetcher::new(ds.clone(), indices, 4, deltas, 1);
    assert!(it.next().unwrap().is_ok());
    drop(it);
    // An out-of-range index surfaces as an error, then the iterator ends.
    let mut it = Prefetcher::new(ds, vec![0, 999], 1, BTreeMap::new(), 1);
    assert!(it.next().unwrap().is_ok());
    assert!(it.next().unwrap().is_err());
    assert!(it.next().is_none());
}
