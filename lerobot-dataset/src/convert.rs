//! v2.1 → v3.0 conversion (`convert_dataset_v21_to_v30`): frames are copied value for value,
//! each episode's mp4 is stream-copied onto the v3.0 video files (no re-encode, pixels identical),
//! per-episode stats come from `episodes_stats.jsonl`, and stats.json is their aggregate.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{DatasetError, Result};
use crate::meta::{Features, Version};
use crate::reader::LeRobotDataset;
use crate::stats::{FeatureStats, Stats};
use crate::video::EncoderConfig;
use crate::writer::{DatasetConfig, DatasetWriter, FrameData};

/// Converts the v2.1 dataset at `src` into a new v3.0 dataset at `dst` and opens it.
pub fn convert_v21_to_v30(src: &Path, dst: &Path) -> Result<LeRobotDataset> {
    let ds = LeRobotDataset::open(src)?;
    if ds.version() != Version::V21 {
        return Err(DatasetError::Usage(format!(
            "{} is {}, not v2.1",
            src.display(),
            ds.info().codebase_version
        )));
    }
    let info = ds.info();
    let user: Vec<_> = info
        .features
        .0
        .iter()
        .filter(|(k, _)| !crate::meta::DEFAULT_FEATURE_NAMES.contains(&k.as_str()))
        .map(|(k, f)| {
            let mut f = f.clone();
            f.info = None; // re-probed from the written files
            (k.clone(), f)
        })
        .collect();
    let cfg = DatasetConfig {
        fps: info.fps,
        robot_type: info.robot_type.clone(),
        features: Features(user),
        chunks_size: crate::meta::DEFAULT_CHUNK_SIZE,
        data_files_size_in_mb: crate::meta::DEFAULT_DATA_FILE_SIZE_IN_MB,
        video_files_size_in_mb: crate::meta::DEFAULT_VIDEO_FILE_SIZE_IN_MB,
        encoder: EncoderConfig::default(),
    };
    let mut w = DatasetWriter::create(dst, cfg)?;
    let image_keys: Vec<String> = info
        .features
        .iter()
        .filter(|(_, f)| f.is_image())
        .map(|(k, _)| k.to_string())
        .collect();
    for ep in ds.episodes() {
        for idx in ep.dataset_from_index..ep.dataset_to_index {
            let mut fr = if image_keys.is_empty() {
                ds.get_values(idx)?
            } else {
                ds.get(idx)?
            };
            for d in crate::meta::DEFAULT_FEATURE_NAMES {
                fr.features.remove(d);
            }
            let images = fr
                .images
                .into_iter()
                .filter(|(k, _)| image_keys.contains(k))
                .collect();
            w.add_frame(FrameData {
                values: fr.features,
                images,
                task: fr.task,
            })?;
        }
        let videos = ep
            .videos
            .iter()
            .map(|(k, v)| (k.clone(), ds.root().join(&v.path)))
            .collect();
        let camera_stats: Stats = ep
            .stats
            .iter()
            .filter(|(k, _)| info.features.get(k).is_some_and(|f| f.is_video()))
            .filter_map(|(k, v)| Some((k.clone(), FeatureStats::from_json(&serde_json::json!(v))?)))
            .collect::<BTreeMap<_, _>>();
        w.save_episode_with_videos(videos, camera_stats)?;
    }
    LeRobotDataset::open(dst)
}
