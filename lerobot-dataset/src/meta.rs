//! Dataset metadata: `meta/info.json`, tasks, episodes — for v3.0 and v2.1, normalised into one
//! shape ([`Episode`] with resolved file paths) so the frame reader never branches on version.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{inconsistent, io_err, DatasetError, Result};
use crate::table::{self, cell_json, column, FeatureValue};

/// `DEFAULT_DATA_PATH` (v3.0).
pub const DEFAULT_DATA_PATH: &str = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet";
/// `DEFAULT_VIDEO_PATH` (v3.0).
pub const DEFAULT_VIDEO_PATH: &str =
    "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4";
/// `DEFAULT_EPISODES_PATH`: not templated in info.json.
pub const DEFAULT_EPISODES_PATH: &str =
    "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet";
pub const DEFAULT_TASKS_PATH: &str = "meta/tasks.parquet";
pub const DEFAULT_CHUNK_SIZE: usize = 1000;
pub const DEFAULT_DATA_FILE_SIZE_IN_MB: f64 = 100.0;
pub const DEFAULT_VIDEO_FILE_SIZE_IN_MB: f64 = 200.0;
/// The five columns LeRobot appends to every dataset (`DEFAULT_FEATURES`).
pub const DEFAULT_FEATURE_NAMES: [&str; 5] = [
    "timestamp",
    "frame_index",
    "episode_index",
    "index",
    "task_index",
];

/// Format generation of a dataset on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V21,
    V30,
}

/// One entry of `info.json` `features`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feature {
    /// numpy dtype string, or `video` / `image` / `string`.
    pub dtype: String,
    /// Cameras are `[H, W, C]`; shape `[1]` is a scalar column.
    pub shape: Vec<usize>,
    /// List, object (`{"motors": [...]}`) or null: kept verbatim.
    #[serde(default)]
    pub names: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

impl Feature {
    pub fn is_video(&self) -> bool {
        self.dtype == "video"
    }
    pub fn is_image(&self) -> bool {
        self.dtype == "image"
    }
    pub fn is_camera(&self) -> bool {
        self.is_video() || self.is_image()
    }
    /// `(height, width)` of a camera feature.
    pub fn hw(&self) -> Option<(usize, usize)> {
        (self.is_camera() && self.shape.len() == 3).then(|| (self.shape[0], self.shape[1]))
    }
    /// Number of scalar elements per frame.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// `features` in file order (user features first, defaults last), which serde_json's map loses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Features(pub Vec<(String, Feature)>);

impl Features {
    pub fn get(&self, name: &str) -> Option<&Feature> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Feature)> {
        self.0.iter().map(|(n, f)| (n.as_str(), f))
    }
    /// Camera features (video and image), in file order.
    pub fn cameras(&self) -> impl Iterator<Item = (&str, &Feature)> {
        self.iter().filter(|(_, f)| f.is_camera())
    }
}

impl Serialize for Features {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Features {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Features;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of feature name to feature")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Features, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Feature>()? {
                    out.push((k, v));
                }
                Ok(Features(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn default_chunks_size() -> usize {
    DEFAULT_CHUNK_SIZE
}
fn default_data_mb() -> f64 {
    DEFAULT_DATA_FILE_SIZE_IN_MB
}
fn default_video_mb() -> f64 {
    DEFAULT_VIDEO_FILE_SIZE_IN_MB
}
fn default_data_path() -> String {
    DEFAULT_DATA_PATH.into()
}

/// `meta/info.json`, fields in the order LeRobot's `DatasetInfo.to_dict` writes them.
/// Unknown keys (v2.x `total_chunks`, `total_videos`) are ignored, like `DatasetInfo.from_dict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub codebase_version: String,
    pub fps: u32,
    pub features: Features,
    pub total_episodes: usize,
    pub total_frames: usize,
    pub total_tasks: usize,
    #[serde(default = "default_chunks_size")]
    pub chunks_size: usize,
    #[serde(default = "default_data_mb")]
    pub data_files_size_in_mb: f64,
    #[serde(default = "default_video_mb")]
    pub video_files_size_in_mb: f64,
    #[serde(default = "default_data_path")]
    pub data_path: String,
    #[serde(default)]
    pub video_path: Option<String>,
    #[serde(default)]
    pub robot_type: Option<String>,
    #[serde(default)]
    pub splits: serde_json::Value,
}

impl Info {
    pub fn load(root: &Path) -> Result<Info> {
        let path = root.join("meta/info.json");
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let info: Info = serde_json::from_str(&text).map_err(|source| DatasetError::Json {
            path: path.clone(),
            source,
        })?;
        if info.fps == 0 {
            return Err(inconsistent(&path, "fps must be > 0"));
        }
        Ok(info)
    }

    pub fn version(&self, path: &Path) -> Result<Version> {
        match self.codebase_version.as_str() {
            "v3.0" => Ok(Version::V30),
            "v2.1" | "v2.0" => Ok(Version::V21),
            v => Err(DatasetError::UnsupportedVersion {
                path: path.to_path_buf(),
                version: v.into(),
            }),
        }
    }
}

/// Fills a Python-format path template: `{name}` or `{name:0Nd}` with named integer or string
/// arguments (`str.format` as LeRobot uses it; widths widen past 999 like `:03d`).
pub fn format_path(
    template: &str,
    ints: &[(&str, usize)],
    strs: &[(&str, &str)],
) -> Result<String> {
    let bad = |m: String| DatasetError::Usage(format!("path template {template:?}: {m}"));
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| bad("unclosed '{'".into()))?
            + open;
        let field = &rest[open + 1..close];
        let (name, spec) = field.split_once(':').unwrap_or((field, ""));
        if let Some((_, v)) = ints.iter().find(|(n, _)| *n == name) {
            let width: usize = spec
                .trim_start_matches('0')
                .trim_end_matches('d')
                .parse()
                .unwrap_or(0);
            out.push_str(&format!("{v:0width$}"));
        } else if let Some((_, v)) = strs.iter().find(|(n, _)| *n == name) {
            out.push_str(v);
        } else {
            return Err(bad(format!("unknown field {name:?}")));
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Where one camera's frames of one episode live.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoSpan {
    /// Relative to the dataset root.
    pub path: PathBuf,
    pub chunk_index: usize,
    pub file_index: usize,
    /// The episode's start inside the mp4, seconds (0 in v2.1: one file per episode).
    pub from_timestamp: f64,
    pub to_timestamp: f64,
}

/// One episode, with every file it touches resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub episode_index: usize,
    pub tasks: Vec<String>,
    pub length: usize,
    /// Data parquet holding the episode, relative to the root.
    pub data_path: PathBuf,
    /// `(chunk_index, file_index)` of the data file (v3.0; v2.1 has one file per episode).
    pub data_location: Option<(usize, usize)>,
    /// Global `index` range `[from, to)`.
    pub dataset_from_index: usize,
    pub dataset_to_index: usize,
    pub videos: BTreeMap<String, VideoSpan>,
    /// `(chunk_index, file_index)` of the meta/episodes file holding this row (v3.0).
    pub meta_location: Option<(usize, usize)>,
    /// Per-episode stats `{feature: {stat: json}}`, when present.
    pub stats: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
}

/// Every `*/*.parquet` under `dir`, sorted by path (`sorted(dir.glob("*/*.parquet"))`).
pub fn chunked_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for chunk in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let chunk = chunk.map_err(io_err(dir))?.path();
        if !chunk.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&chunk).map_err(io_err(&chunk))? {
            let f = f.map_err(io_err(&chunk))?.path();
            if f.extension().is_some_and(|e| e == "parquet") {
                out.push(f);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn usize_of(v: i64, path: &Path, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| inconsistent(path, format!("{what} is negative ({v})")))
}

/// Reads `meta/tasks.parquet`: the task strings indexed by `task_index`.
pub fn load_tasks_v3(root: &Path) -> Result<Vec<String>> {
    let path = root.join(DEFAULT_TASKS_PATH);
    let batch = table::read_parquet(&path)?;
    let idx = column(&batch, "task_index", &path)?.clone();
    // The task string is the pandas index column `task` (sometimes `__index_level_0__`).
    let names = batch
        .column_by_name("task")
        .or_else(|| batch.column_by_name("__index_level_0__"))
        .ok_or_else(|| inconsistent(&path, "missing column \"task\""))?;
    let mut pairs = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        let i = match table::cell_value(idx.as_ref(), row) {
            Some(FeatureValue::Int(v)) if v.len() == 1 => usize_of(v[0], &path, "task_index")?,
            _ => return Err(inconsistent(&path, format!("row {row}: bad task_index"))),
        };
        let t = match table::cell_value(names.as_ref(), row) {
            Some(FeatureValue::Text(s)) => s,
            _ => return Err(inconsistent(&path, format!("row {row}: bad task string"))),
        };
        pairs.push((i, t));
    }
    tasks_from_pairs(pairs, &path)
}

fn tasks_from_pairs(mut pairs: Vec<(usize, String)>, path: &Path) -> Result<Vec<String>> {
    pairs.sort_by_key(|(i, _)| *i);
    for (pos, (i, _)) in pairs.iter().enumerate() {
        if *i != pos {
            return Err(inconsistent(
                path,
                format!(
                    "task_index values are not 0..{}: found {i} at position {pos}",
                    pairs.len()
                ),
            ));
        }
    }
    Ok(pairs.into_iter().map(|(_, t)| t).collect())
}

/// Reads every `meta/episodes/*/*.parquet` (v3.0) and resolves data and video paths.
pub fn load_episodes_v3(root: &Path, info: &Info) -> Result<Vec<Episode>> {
    let files = chunked_files(&root.join("meta/episodes"))?;
    if files.is_empty() && info.total_episodes > 0 {
        return Err(inconsistent(
            root.join("meta/episodes"),
            "no episode metadata files",
        ));
    }
    let video_keys: Vec<&str> = info
        .features
        .iter()
        .filter(|(_, f)| f.is_video())
        .map(|(k, _)| k)
        .collect();
    let mut episodes = Vec::new();
    for path in files {
        let batch = table::read_parquet(&path)?;
        for row in 0..batch.num_rows() {
            let int = |name: &str| -> Result<usize> {
                usize_of(table::int_cell(&batch, name, row, &path)?, &path, name)
            };
            let episode_index = int("episode_index")?;
            let ep_err = |m: String| DatasetError::Episode {
                path: path.clone(),
                episode: episode_index,
                message: m,
            };
            let tasks = match batch.column_by_name("tasks") {
                Some(col) => match cell_json(col.as_ref(), row) {
                    serde_json::Value::Array(a) => a
                        .into_iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect(),
                    _ => return Err(ep_err("column \"tasks\" is not a list of strings".into())),
                },
                None => Vec::new(),
            };
            let (dc, df) = (int("data/chunk_index")?, int("data/file_index")?);
            let data_path = format_path(
                &info.data_path,
                &[("chunk_index", dc), ("file_index", df)],
                &[],
            )?;
            let mut videos = BTreeMap::new();
            for key in &video_keys {
                let template = info.video_path.as_deref().ok_or_else(|| {
                    inconsistent(
                        root.join("meta/info.json"),
                        "video features but video_path is null",
                    )
                })?;
                let (vc, vf) = (
                    int(&format!("videos/{key}/chunk_index"))?,
                    int(&format!("videos/{key}/file_index"))?,
                );
                let p = format_path(
                    template,
                    &[("chunk_index", vc), ("file_index", vf)],
                    &[("video_key", key)],
                )?;
                videos.insert(
                    key.to_string(),
                    VideoSpan {
                        path: p.into(),
                        chunk_index: vc,
                        file_index: vf,
                        from_timestamp: table::float_cell(
                            &batch,
                            &format!("videos/{key}/from_timestamp"),
                            row,
                            &path,
                        )?,
                        to_timestamp: table::float_cell(
                            &batch,
                            &format!("videos/{key}/to_timestamp"),
                            row,
                            &path,
                        )?,
                    },
                );
            }
            let meta_location = match (
                batch.column_by_name("meta/episodes/chunk_index"),
                batch.column_by_name("meta/episodes/file_index"),
            ) {
                (Some(_), Some(_)) => Some((
                    int("meta/episodes/chunk_index")?,
                    int("meta/episodes/file_index")?,
                )),
                _ => None,
            };
            let mut stats: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
            for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
                if let Some(rest) = field.name().strip_prefix("stats/") {
                    if let Some((feat, stat)) = rest.rsplit_once('/') {
                        stats
                            .entry(feat.to_string())
                            .or_default()
                            .insert(stat.to_string(), cell_json(col.as_ref(), row));
                    }
                }
            }
            episodes.push(Episode {
                episode_index,
                tasks,
                length: int("length")?,
                data_path: data_path.into(),
                data_location: Some((dc, df)),
                dataset_from_index: int("dataset_from_index")?,
                dataset_to_index: int("dataset_to_index")?,
                videos,
                meta_location,
                stats,
            });
        }
    }
    episodes.sort_by_key(|e| e.episode_index);
    Ok(episodes)
}

fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|source| DatasetError::Json {
                path: path.to_path_buf(),
                source,
            })
        })
        .collect()
}

/// Reads `meta/tasks.jsonl` (v2.1).
pub fn load_tasks_v21(root: &Path) -> Result<Vec<String>> {
    let path = root.join("meta/tasks.jsonl");
    let mut pairs = Vec::new();
    for v in read_jsonl(&path)? {
        let i = v["task_index"]
            .as_u64()
            .ok_or_else(|| inconsistent(&path, "task_index missing"))?;
        let t = v["task"]
            .as_str()
            .ok_or_else(|| inconsistent(&path, "task missing"))?;
        pairs.push((i as usize, t.to_string()));
    }
    tasks_from_pairs(pairs, &path)
}

/// Reads `meta/episodes.jsonl` (+ `episodes_stats.jsonl` when present) of a v2.1 dataset; each
/// episode has its own data file and, per camera, its own mp4 starting at t = 0.
pub fn load_episodes_v21(root: &Path, info: &Info) -> Result<Vec<Episode>> {
    let path = root.join("meta/episodes.jsonl");
    let mut stats_by_ep: BTreeMap<usize, BTreeMap<String, BTreeMap<String, serde_json::Value>>> =
        BTreeMap::new();
    let stats_path = root.join("meta/episodes_stats.jsonl");
    if stats_path.exists() {
        for v in read_jsonl(&stats_path)? {
            let e = v["episode_index"]
                .as_u64()
                .ok_or_else(|| inconsistent(&stats_path, "episode_index missing"))?
                as usize;
            let s = serde_json::from_value(v["stats"].clone()).map_err(|source| {
                DatasetError::Json {
                    path: stats_path.clone(),
                    source,
                }
            })?;
            stats_by_ep.insert(e, s);
        }
    }
    let chunks_size = info.chunks_size.max(1);
    let mut rows: Vec<(usize, Vec<String>, usize)> = Vec::new();
    for v in read_jsonl(&path)? {
        let e = v["episode_index"]
            .as_u64()
            .ok_or_else(|| inconsistent(&path, "episode_index missing"))? as usize;
        let len = v["length"].as_u64().ok_or_else(|| DatasetError::Episode {
            path: path.clone(),
            episode: e,
            message: "length missing".into(),
        })? as usize;
        let tasks = v["tasks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        rows.push((e, tasks, len));
    }
    rows.sort_by_key(|r| r.0);
    let mut from = 0;
    let mut episodes = Vec::with_capacity(rows.len());
    for (e, tasks, length) in rows {
        let chunk = e / chunks_size;
        let data_path = format_path(
            &info.data_path,
            &[("episode_chunk", chunk), ("episode_index", e)],
            &[],
        )?;
        let mut videos = BTreeMap::new();
        for (key, f) in info.features.iter() {
            if !f.is_video() {
                continue;
            }
            let template = info.video_path.as_deref().ok_or_else(|| {
                inconsistent(
                    root.join("meta/info.json"),
                    "video features but video_path is null",
                )
            })?;
            let p = format_path(
                template,
                &[("episode_chunk", chunk), ("episode_index", e)],
                &[("video_key", key)],
            )?;
            let duration = length as f64 / f64::from(info.fps);
            videos.insert(
                key.to_string(),
                VideoSpan {
                    path: p.into(),
                    chunk_index: chunk,
                    file_index: e,
                    from_timestamp: 0.0,
                    to_timestamp: duration,
                },
            );
        }
        episodes.push(Episode {
            episode_index: e,
            tasks,
            length,
            data_path: data_path.into(),
            data_location: None,
            dataset_from_index: from,
            dataset_to_index: from + length,
            videos,
            meta_location: None,
            stats: stats_by_ep.remove(&e).unwrap_or_default(),
        });
        from += length;
    }
    Ok(episodes)
}

/// Reads `meta/stats.json` if present.
pub fn load_stats(root: &Path) -> Result<Option<serde_json::Value>> {
    let path = root.join("meta/stats.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| DatasetError::Json { path, source })
}
