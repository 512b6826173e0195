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

/// One episode's frames in one camera's video file, as the metadata places them.
#[derive(Debug)]
struct SpanInFile {
    episode: usize,
    camera: String,
    from: f64,
    length: usize,
}

/// Checks every frame of `span` the way LeRobot's decoders look it up, against the file's
/// real presentation times (`times`, ascending): the query `from + i / fps` must have a frame
/// within [`TOLERANCE_S`] (both backends' check), and that frame must be the one at index
/// `round(query * fps)` (torchcodec, LeRobot's default backend, fetches by that index), so
/// the file may neither drift from the metadata nor have frames missing or gaps before it.
fn check_span(
    path: &std::path::Path,
    times: &[f64],
    span: &SpanInFile,
    fps: f64,
) -> Option<DatasetError> {
    let mut bad = (0..span.length).filter_map(|i| {
        let query = span.from + i as f64 / fps;
        let (j, dist) = video::nearest(times, query)?;
        let index = (query * fps).round() as usize;
        (dist > TOLERANCE_S || j != index).then(|| {
            let found = times
                .get(index)
                .map_or("no frame".to_string(), |t| format!("{t:.6}s"));
            (i, query, times[j], found, index)
        })
    });
    let (i, query, nearest, at_index, index) = bad.next()?;
    let more = bad.count();
    Some(DatasetError::Episode {
        path: path.to_path_buf(),
        episode: span.episode,
        message: format!(
            "{}: frame {i} of the episode is queried at {query:.6}s, but the nearest frame in the video is at {nearest:.6}s and frame {index} (where LeRobot's torchcodec looks) at {at_index} (tolerance {TOLERANCE_S}s){}",
            span.camera,
            if more > 0 { format!("; {more} later frame(s) of this episode too") } else { String::new() }
        ),
    })
}

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

/// Checks indices, lengths, timestamps, tasks, the presence of stats, and for every episode
/// and camera that each frame is in its video file where the metadata says (LeRobot's lookup
/// and tolerance: see `check_span`).
pub fn verify(ds: &LeRobotDataset) -> VerifyReport {
    let mut r = VerifyReport {
        episodes: ds.episodes().len(),
        frames: ds.len(),
        ..Default::default()
    };
    let fps = f64::from(ds.fps());
    let mut data_files: BTreeMap<PathBuf, ()> = BTreeMap::new();
    // video file → the episode spans it holds
    let mut videos: BTreeMap<PathBuf, Vec<SpanInFile>> = BTreeMap::new();
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
            videos
                .entry(ds.root().join(&span.path))
                .or_default()
                .push(SpanInFile {
                    episode: ep.episode_index,
                    camera: key.clone(),
                    from: span.from_timestamp,
                    length: ep.length,
                });
        }
    }
    r.data_files = data_files.len();
    r.video_files = videos.len();
    for (path, spans) in &videos {
        if !path.exists() {
            r.problems.push(DatasetError::Episode {
                path: path.clone(),
                episode: spans[0].episode,
                message: "video file is missing".into(),
            });
            continue;
        }
        match video::frame_times(path, None) {
            Ok(times) => r.problems.extend(
                spans
                    .iter()
                    .filter_map(|s| check_span(path, &times, s, fps)),
            ),
            Err(e) => r.problems.push(e),
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
