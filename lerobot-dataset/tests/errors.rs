//! Damaged datasets give a clear error naming the file (and episode), never a panic.

use std::path::{Path, PathBuf};

use lerobot_dataset::{DatasetError, LeRobotDataset};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(name)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy_dir(&fixture(name), &dir);
    (tmp, dir)
}

#[test]
fn truncated_data_parquet() {
    let (_t, dir) = scratch("lerobot-v3-edge");
    let f = dir.join("data/chunk-000/file-001.parquet");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let ds = LeRobotDataset::open(&dir).unwrap(); // metadata is intact
    assert!(ds.get(0).is_ok(), "other files still read");
    let err = ds.get(60).unwrap_err();
    assert!(matches!(err, DatasetError::Parquet { .. }), "{err:?}");
    assert!(
        err.to_string().contains("data/chunk-000/file-001.parquet"),
        "{err}"
    );
}

#[test]
fn corrupt_episodes_parquet() {
    let (_t, dir) = scratch("lerobot-v3-tiny");
    let f = dir.join("meta/episodes/chunk-000/file-000.parquet");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 12..n - 4].fill(0xff); // footer length garbage
    std::fs::write(&f, &bytes).unwrap();
    let err = LeRobotDataset::open(&dir).unwrap_err();
    assert!(
        err.to_string()
            .contains("meta/episodes/chunk-000/file-000.parquet"),
        "{err}"
    );
}

#[test]
fn missing_video() {
    let (_t, dir) = scratch("lerobot-v3-edge");
    std::fs::remove_file(dir.join("videos/observation.images.front/chunk-000/file-001.mp4"))
        .unwrap();
    let ds = LeRobotDataset::open(&dir).unwrap();
    let err = ds.get_episode_frame(2, 0).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("chunk-000/file-001.mp4")
            && msg.contains("episode 2")
            && msg.contains("missing"),
        "{msg}"
    );
    assert!(
        ds.get_values(ds.global_index(2, 0).unwrap()).is_ok(),
        "parquet values still readable"
    );
}

#[test]
fn inconsistent_totals() {
    let (_t, dir) = scratch("lerobot-v3-tiny");
    let p = dir.join("meta/info.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"total_frames\": 75", "\"total_frames\": 80");
    std::fs::write(&p, text).unwrap();
    let err = LeRobotDataset::open(&dir).unwrap_err();
    assert!(
        err.to_string().contains("total_frames is 80") && err.to_string().contains("info.json"),
        "{err}"
    );
}

#[test]
fn unknown_version_and_bad_json() {
    let (_t, dir) = scratch("lerobot-v3-tiny");
    let p = dir.join("meta/info.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("\"v3.0\"", "\"v9.9\"")).unwrap();
    assert!(matches!(
        LeRobotDataset::open(&dir).unwrap_err(),
        DatasetError::UnsupportedVersion { .. }
    ));
    std::fs::write(&p, &text[..text.len() / 2]).unwrap();
    assert!(matches!(
        LeRobotDataset::open(&dir).unwrap_err(),
        DatasetError::Json { .. }
    ));
}

#[test]
fn v21_missing_episode_file() {
    let (_t, dir) = scratch("lerobot-v21-tiny");
    std::fs::remove_file(dir.join("data/chunk-000/episode_000001.parquet")).unwrap();
    let ds = LeRobotDataset::open(&dir).unwrap();
    let err = ds.get(30).unwrap_err().to_string();
    assert!(
        err.contains("episode_000001.parquet") && err.contains("episode 1"),
        "{err}"
    );
}

#[test]
fn every_truncation_of_a_data_file_errors_cleanly() {
    let (_t, dir) = scratch("lerobot-v3-tiny");
    let f = dir.join("data/chunk-000/file-000.parquet");
    let bytes = std::fs::read(&f).unwrap();
    for cut in (0..bytes.len()).step_by(bytes.len() / 40 + 1) {
        std::fs::write(&f, &bytes[..cut]).unwrap();
        let ds = LeRobotDataset::open(&dir).unwrap();
        assert!(ds.get_values(10).is_err(), "cut at {cut}");
    }
}

#[test]
fn verify_passes_on_every_fixture() {
    for name in [
        "lerobot-v3-tiny",
        "lerobot-v3-edge",
        "lerobot-v21-tiny",
        "lerobot-v3-converted-tiny",
    ] {
        let ds = LeRobotDataset::open(fixture(name)).unwrap();
        let r = lerobot_dataset::verify::verify(&ds);
        assert!(r.problems.is_empty(), "{name}: {:?}", r.problems);
    }
}

#[test]
fn verify_names_file_and_episode() {
    let (_t, dir) = scratch("lerobot-v3-edge");
    // The file of episodes 0 and 1 (55 frames) is replaced by episode 4's (30 frames): episode
    // 0's 25 frames are still there, episode 1 runs past the end of the file.
    std::fs::copy(
        dir.join("videos/observation.images.front/chunk-001/file-000.mp4"),
        dir.join("videos/observation.images.front/chunk-000/file-000.mp4"),
    )
    .unwrap();
    let ds = LeRobotDataset::open(&dir).unwrap();
    let r = lerobot_dataset::verify::verify(&ds);
    let msgs: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        msgs.iter().any(|m| m.contains("chunk-000/file-000.mp4")
            && m.contains("episode 1: observation.images.front: frame")
            && m.contains("no frame")),
        "{msgs:?}"
    );
}

/// A dataset in hf-hub's cache layout resolves to its snapshot directory (offline path).
#[test]
fn hub_cache_snapshot_resolves() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("datasets--local--lerobot-v3-tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    copy_dir(
        &fixture("lerobot-v3-tiny"),
        &repo.join("snapshots/0123abcd"),
    );
    let root =
        lerobot_dataset::hub::cached_snapshot(tmp.path(), "local/lerobot-v3-tiny", None).unwrap();
    assert_eq!(LeRobotDataset::open(root).unwrap().len(), 75);
    assert!(lerobot_dataset::hub::cached_snapshot(tmp.path(), "local/absent", None).is_none());
}
