//! The block cache and long-lived decoders return exactly the frames that one ffmpeg seek per
//! frame returns (the reader with the cache off), whatever the access order.

use std::path::PathBuf;

use lerobot_dataset::synth::{self, SynthConfig};
use lerobot_dataset::LeRobotDataset;
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(name)
}

fn same_frames(root: &std::path::Path, order: &[usize]) {
    let cached = LeRobotDataset::open(root).unwrap();
    let plain = LeRobotDataset::open(root).unwrap();
    plain.set_frame_cache_bytes(0);
    for &i in order {
        let (a, b) = (cached.get(i).unwrap(), plain.get(i).unwrap());
        assert!(!a.images.is_empty());
        for (cam, img) in &a.images {
            assert!(
                img == &b.images[cam],
                "{}: frame {i} {cam} differs",
                root.display()
            );
        }
    }
}

#[test]
fn cached_random_access_matches_per_frame_seek() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = SynthConfig {
        episodes: 2,
        frames_per_episode: 70,
        cameras: vec![("front".into(), 64, 64)],
        ..Default::default()
    };
    let ds = synth::generate(&root, &cfg).unwrap();
    let mut order: Vec<usize> = (0..ds.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
    order.truncate(40);
    // Sequential runs across block and episode boundaries, then jumps backwards.
    order.extend(28..40);
    order.extend(60..75);
    order.extend([139, 0, 64, 63, 96, 95]);
    same_frames(&root, &order);
}

#[test]
fn cached_access_matches_on_lerobot_fixtures() {
    for name in ["lerobot-v3-edge", "lerobot-v3-tiny", "lerobot-v21-tiny"] {
        let root = fixture(name);
        let n = LeRobotDataset::open(&root).unwrap().len();
        let mut order: Vec<usize> = (0..n).rev().step_by(3).collect();
        order.extend((0..n).step_by(5));
        same_frames(&root, &order);
    }
}
