//! Whole-dataset checks (`zk0-agent dataset verify`): every problem found, each naming its file
//! and episode, rather than stopping at the first.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::DatasetError;
use crate::meta::Version;
use crate::reader::LeRobotDataset;
use crate::table::{self, FeatureValue};
use crate::video;

/// Tolerance on timestamps, as LeRobot's `tolerance_s`.
pub const TOLERANCE_S: f64 = 1e-4;

/// Summary of a verification run.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub episodes: usize,
    pub frames: usize,
    pub data_files: usize,
    pub video_files: usize,
    /// Each problem as an error naming file and episode; empty when the dataset is valid.
    pub problems: Vec<DatasetError>,
}

/// Checks indices, lengths, timestamps, tasks, video files (ffprobe: frame count, duration,
/// size) and the presence of stats.
pub fn verify(ds: &LeRobotDataset) -> VerifyReport {
    let mut r = VerifyReport {
        episodes: ds.episodes().len(),
        frames: ds.len(),
        ..Default::default()
    };
    let fps = f64::from(ds.fps());
    let mut data_files: BTreeMap<PathBuf, ()> = BTreeMap::new();
    // video file → (episode spans it holds)
    let mut videos: BTreeMap<PathBuf, Vec<(usize, f64, f64, usize)>> = BTreeMap::new();
    for ep in ds.episodes() {
        let path = ds.root().join(&ep.data_path);
        let problem = |m: String| DatasetError::Episode {
            path: path.clone(),
            episode: ep.episode_index,
            message: m,
        };
        data_files.insert(path.clone(), ());
        let batch = match table::read_parquet(&path) {
            Ok(b) => b,
            Err(e) => {
                r.problems.push(e);
                continue;
            }
        };
        let col = |name: &str| batch.column_by_name(name).cloned();
        let (Some(idx), Some(epi), Some(fi), Some(ts), Some(ti)) = (
            col("index"),
            col("episode_index"),
            col("frame_index"),
            col("timestamp"),
            col("task_index"),
        ) else {
            r.problems.push(problem("missing one of the columns index, episode_index, frame_index, timestamp, task_index".into()));
            continue;
        };
        let int = |a: &arrow::array::ArrayRef, row: usize| match table::cell_value(a.as_ref(), row)
        {
            Some(FeatureValue::Int(v)) if v.len() == 1 => Some(v[0]),
            _ => None,
        };
        let rows: Vec<usize> = (0..batch.num_rows())
            .filter(|&row| int(&epi, row) == Some(ep.episode_index as i64))
            .collect();
        if rows.len() != ep.length {
            r.problems.push(problem(format!(
                "metadata says {} frames, the data file has {}",
                ep.length,
                rows.len()
            )));
        }
        for (k, &row) in rows.iter().enumerate() {
            let want = ep.dataset_from_index + k;
            if int(&idx, row) != Some(want as i64) {
                r.problems.push(problem(format!(
                    "row {row}: index {:?}, expected {want}",
                    int(&idx, row)
                )));
                break;
            }
            if int(&fi, row) != Some(k as i64) {
                r.problems.push(problem(format!(
                    "row {row}: frame_index {:?}, expected {k}",
                    int(&fi, row)
                )));
                break;
            }
            let t = match table::cell_value(ts.as_ref(), row) {
                Some(FeatureValue::Float(v)) if v.len() == 1 => v[0],
                _ => f64::NAN,
            };
            if (t - k as f64 / fps).abs().is_nan() || (t - k as f64 / fps).abs() > TOLERANCE_S {
                r.problems.push(problem(format!(
                    "row {row}: timestamp {t}, expected {:.6} (frame_index / fps)",
                    k as f64 / fps
                )));
                break;
            }
            match int(&ti, row) {
                Some(t) if (t as usize) < ds.tasks().len() && t >= 0 => {}
                t => {
                    r.problems.push(problem(format!(
                        "row {row}: task_index {t:?} is not in the tasks table"
                    )));
                    break;
                }
            }
        }
        for (key, span) in &ep.videos {
            let dur = span.to_timestamp - span.from_timestamp;
            if (dur - ep.length as f64 / fps).abs() > TOLERANCE_S * 10.0 {
                r.problems.push(DatasetError::Episode {
                    path: ds.root().join(&span.path),
                    episode: ep.episode_index,
                    message: format!(
                        "{key}: span [{}, {}) is {dur:.6}s but the episode lasts {:.6}s",
                        span.from_timestamp,
                        span.to_timestamp,
                        ep.length as f64 / fps
                    ),
                });
            }
            videos.entry(ds.root().join(&span.path)).or_default().push((
                ep.episode_index,
                span.from_timestamp,
                span.to_timestamp,
                ep.length,
            ));
        }
    }
    r.data_files = data_files.len();
    r.video_files = videos.len();
    for (path, spans) in &videos {
        let first_ep = spans[0].0;
        let problem = |m: String| DatasetError::Episode {
            path: path.clone(),
            episode: first_ep,
            message: m,
        };
        if !path.exists() {
            r.problems.push(problem("video file is missing".into()));
            continue;
        }
        let p = match video::probe(path) {
            Ok(p) => p,
            Err(e) => {
                r.problems.push(e);
                continue;
            }
        };
        let end = spans.iter().map(|s| s.2).fold(0.0, f64::max);
        let frames: usize = spans.iter().map(|s| s.3).sum();
        if let Some(n) = p.frames {
            // More frames is fine (an interrupted save may leave uncommitted frames at the end).
            if n < frames {
                r.problems.push(problem(format!(
                    "ffprobe counts {n} frames, the episodes in this file need {frames}"
                )));
            }
        }
        if let Some(d) = p.duration_s {
            if d < end - 1.5 / fps {
                r.problems.push(problem(format!(
                    "ffprobe duration {d:.6}s, the episodes end at {end:.6}s"
                )));
            }
        }
    }
    // Stats: dataset-level (v3.0) or per episode (v2.1), for every non-string feature.
    let stats_keys: Vec<String> = match (ds.version(), ds.stats()) {
        (_, Some(s)) => s
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default(),
        (Version::V21, None) => ds
            .episodes()
            .first()
            .map(|e| e.stats.keys().cloned().collect())
            .unwrap_or_default(),
        (Version::V30, None) => {
            r.problems.push(DatasetError::Inconsistent {
                path: ds.root().join("meta/stats.json"),
                message: "missing".into(),
            });
            return r;
        }
    };
    for (k, f) in ds.info().features.iter() {
        if f.dtype != "string" && f.dtype != "language" && !stats_keys.iter().any(|s| s == k) {
            r.problems.push(DatasetError::Inconsistent {
                path: ds.root().join("meta/stats.json"),
                message: format!("no stats for feature {k:?}"),
            });
        }
    }
    r
}
