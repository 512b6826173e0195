//! [`DatasetWriter`]: records LeRobot v3.0 datasets the way LeRobot's `DatasetWriter` does.
//!
//! `create` → `add_frame`… → `save_episode` (repeat). Each episode is appended to the current data
//! parquet (one row group per episode) and to each camera's current mp4 (encoded on its own, then
//! stream-copied onto the file), rolling over to a new file — and a new chunk after `chunks_size`
//! files — by LeRobot's size rules. Then its meta/episodes row, tasks, stats.json and info.json.
//!
//! Crash safety: every file is rewritten whole into a temporary file, fsynced and renamed over the
//! old one, and `meta/info.json` is renamed last. Its totals are the commit point: readers ignore
//! episodes, tasks, rows and trailing video frames beyond them, so a process killed mid-save
//! leaves a valid dataset holding the earlier episodes.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, FixedSizeListArray, Float32Array, Float64Array,
    Float64Builder, Int32Array, Int64Array, Int64Builder, ListBuilder, RecordBatch, StringArray,
    StringBuilder, StructArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use image::RgbImage;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{io_err, DatasetError, Result};
use crate::meta::{
    format_path, Feature, Features, Info, DEFAULT_EPISODES_PATH, DEFAULT_TASKS_PATH,
    DEFAULT_VIDEO_PATH,
};
use crate::stats::{self, FeatureStats, Stats, QUANTILES};
use crate::table::FeatureValue;
use crate::video::{self, EncoderConfig};

/// Joint names of the SO-100/SO-101 follower (`so100_follower`, `so101_follower`).
pub const SO100_JOINTS: [&str; 6] = [
    "shoulder_pan.pos",
    "shoulder_lift.pos",
    "elbow_flex.pos",
    "wrist_flex.pos",
    "wrist_roll.pos",
    "gripper.pos",
];

/// What to create: user features (the five defaults are appended), rate, sizes, encoder.
#[derive(Debug, Clone)]
pub struct DatasetConfig {
    pub fps: u32,
    pub robot_type: Option<String>,
    pub features: Features,
    pub chunks_size: usize,
    pub data_files_size_in_mb: f64,
    pub video_files_size_in_mb: f64,
    pub encoder: EncoderConfig,
}

impl DatasetConfig {
    /// SO-100/SO-101 follower at 30 fps: 6-joint `observation.state` and `action`, plus one video
    /// camera `observation.images.<name>` per `(name, width, height)`.
    pub fn so100(cameras: &[(&str, u32, u32)]) -> Self {
        let joints = || Feature {
            dtype: "float32".into(),
            shape: vec![6],
            names: serde_json::json!(SO100_JOINTS),
            info: None,
        };
        let mut features = vec![
            ("observation.state".to_string(), joints()),
            ("action".to_string(), joints()),
        ];
        for (name, w, h) in cameras {
            features.push((
                format!("observation.images.{name}"),
                Feature {
                    dtype: "video".into(),
                    shape: vec![*h as usize, *w as usize, 3],
                    names: serde_json::json!(["height", "width", "channels"]),
                    info: None,
                },
            ));
        }
        DatasetConfig {
            fps: 30,
            robot_type: Some("so100_follower".into()),
            features: Features(features),
            chunks_size: crate::meta::DEFAULT_CHUNK_SIZE,
            data_files_size_in_mb: crate::meta::DEFAULT_DATA_FILE_SIZE_IN_MB,
            video_files_size_in_mb: crate::meta::DEFAULT_VIDEO_FILE_SIZE_IN_MB,
            encoder: EncoderConfig::default(),
        }
    }
}

/// One frame to record: a value per non-camera feature, an image per camera, the task string.
#[derive(Debug, Clone, Default)]
pub struct FrameData {
    pub values: BTreeMap<String, FeatureValue>,
    pub images: BTreeMap<String, RgbImage>,
    pub task: String,
}

/// The file an appender writes next, and what it already holds.
#[derive(Debug, Default)]
struct Cursor {
    chunk: usize,
    file: usize,
    /// Whether the current file has content (else the next episode starts it).
    open: bool,
    frames: usize,
}

impl Cursor {
    /// `update_chunk_file_indices`.
    fn advance(&mut self, chunks_size: usize) {
        if self.file + 1 >= chunks_size {
            self.file = 0;
            self.chunk += 1;
        } else {
            self.file += 1;
        }
        self.open = false;
        self.frames = 0;
    }
}

/// A meta/episodes row kept for rewriting its file.
#[derive(Debug, Clone)]
struct EpisodeRow {
    episode_index: usize,
    tasks: Vec<String>,
    length: usize,
    data: (usize, usize),
    from: usize,
    videos: BTreeMap<String, VideoLoc>,
    stats: Stats,
    meta: (usize, usize),
}

/// Where an episode's frames are in one camera's video files.
#[derive(Debug, Clone, Copy, Default)]
struct VideoLoc {
    chunk: usize,
    file: usize,
    /// Presentation time of the episode's first frame in the file.
    from_ts: f64,
    /// `from_ts + length / fps` (LeRobot: the previous end plus the episode's duration).
    to_ts: f64,
}

/// One episode's video for one camera: frames to encode, or an mp4 encoded already.
enum EpisodeVideo<'a> {
    Frames(Vec<RgbImage>),
    Encoded(&'a Path),
}

/// The episode just appended is the last `len` frames of `path`: returns its first frame's
/// presentation time after checking that it starts where the frames before it end
/// (`expected_from`, so LeRobot's index-based decoder finds it too) and that every one of its
/// frames sits at `first + i / fps`, all within LeRobot's tolerance.
fn measured_span_start(
    path: &Path,
    ep: usize,
    key: &str,
    expected_from: f64,
    len: usize,
    fps: f64,
) -> Result<f64> {
    let fail = |message: String| DatasetError::Video {
        path: path.to_path_buf(),
        episode: ep,
        timestamp: expected_from,
        message,
    };
    // Only the tail matters: start a second before the episode (at its keyframe, or earlier).
    let times = video::frame_times(path, Some(expected_from - 1.0))?;
    if times.len() < len {
        return Err(fail(format!(
            "{key}: the file ends {} frame(s) into an episode of {len}",
            times.len()
        )));
    }
    let ep_times = &times[times.len() - len..];
    let first = ep_times[0];
    if (first - expected_from).abs() > crate::verify::TOLERANCE_S {
        return Err(fail(format!(
            "{key}: the episode's first frame landed at {first:.6}s in the video, not at {expected_from:.6}s right after the frames before it"
        )));
    }
    for (i, t) in ep_times.iter().enumerate() {
        let want = first + i as f64 / fps;
        if (t - want).abs() > crate::verify::TOLERANCE_S {
            return Err(fail(format!(
                "{key}: frame {i} of the episode is at {t:.6}s, not {want:.6}s (first frame + i/fps): the encoder did not keep a constant frame rate"
            )));
        }
    }
    Ok(first)
}

/// Writes a new v3.0 dataset.
#[derive(Debug)]
pub struct DatasetWriter {
    root: PathBuf,
    info: Info,
    encoder: EncoderConfig,
    tasks: Vec<String>,
    buffer: Vec<FrameData>,
    stats: Vec<Stats>,
    data: Cursor,
    data_batches: Vec<RecordBatch>,
    videos: BTreeMap<String, Cursor>,
    meta: Cursor,
    meta_rows: Vec<EpisodeRow>,
}

fn default_feature(dtype: &str) -> Feature {
    Feature {
        dtype: dtype.into(),
        shape: vec![1],
        names: serde_json::Value::Null,
        info: None,
    }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    write(&tmp)?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    // Directory fsync makes the rename durable (best effort: not every filesystem allows it).
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn file_mb(path: &Path) -> f64 {
    std::fs::metadata(path)
        .map(|m| m.len() as f64 / (1024.0 * 1024.0))
        .unwrap_or(0.0)
}

fn arrow_type(dtype: &str) -> Result<DataType> {
    Ok(match dtype {
        "float32" => DataType::Float32,
        "float64" => DataType::Float64,
        "int64" => DataType::Int64,
        "int32" => DataType::Int32,
        "bool" => DataType::Boolean,
        "string" => DataType::Utf8,
        d => {
            return Err(DatasetError::Usage(format!(
                "unsupported feature dtype {d:?}"
            )))
        }
    })
}

fn write_parquet(path: &Path, schema: Arc<Schema>, batches: &[RecordBatch]) -> Result<()> {
    write_atomic(path, |tmp| {
        let pq = |e: &dyn std::fmt::Display| DatasetError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let file = File::create(tmp).map_err(io_err(tmp))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut w = ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| pq(&e))?;
        for b in batches {
            // One row group per batch (per episode), as LeRobot's `write_table` does.
            w.write(b).map_err(|e| pq(&e))?;
            w.flush().map_err(|e| pq(&e))?;
        }
        w.close().map_err(|e| pq(&e))?;
        Ok(())
    })
}

impl DatasetWriter {
    /// Creates `root` (which must not hold a dataset yet) and writes its info.json.
    pub fn create(root: impl AsRef<Path>, cfg: DatasetConfig) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if root.join("meta/info.json").exists() {
            return Err(DatasetError::Usage(format!(
                "{} already holds a dataset",
                root.display()
            )));
        }
        let mut features = cfg.features.0.clone();
        for (name, f) in &features {
            if crate::meta::DEFAULT_FEATURE_NAMES.contains(&name.as_str()) {
                return Err(DatasetError::Usage(format!(
                    "feature {name:?} is added by the writer"
                )));
            }
            if !f.is_camera() {
                arrow_type(&f.dtype)?;
            } else if f.hw().is_none() {
                return Err(DatasetError::Usage(format!(
                    "camera {name:?} needs shape [H, W, 3]"
                )));
            }
        }
        features.push(("timestamp".into(), default_feature("float32")));
        for n in ["frame_index", "episode_index", "index", "task_index"] {
            features.push((n.into(), default_feature("int64")));
        }
        let has_video = features.iter().any(|(_, f)| f.is_video());
        let info = Info {
            codebase_version: "v3.0".into(),
            fps: cfg.fps,
            features: Features(features),
            total_episodes: 0,
            total_frames: 0,
            total_tasks: 0,
            chunks_size: cfg.chunks_size.max(1),
            data_files_size_in_mb: cfg.data_files_size_in_mb,
            video_files_size_in_mb: cfg.video_files_size_in_mb,
            data_path: crate::meta::DEFAULT_DATA_PATH.into(),
            video_path: has_video.then(|| DEFAULT_VIDEO_PATH.into()),
            robot_type: cfg.robot_type,
            splits: serde_json::json!({}),
        };
        let videos = info
            .features
            .iter()
            .filter(|(_, f)| f.is_video())
            .map(|(k, _)| (k.to_string(), Cursor::default()))
            .collect();
        let w = DatasetWriter {
            root,
            info,
            encoder: cfg.encoder,
            tasks: Vec::new(),
            buffer: Vec::new(),
            stats: Vec::new(),
            data: Cursor::default(),
            data_batches: Vec::new(),
            videos,
            meta: Cursor::default(),
            meta_rows: Vec::new(),
        };
        w.write_info()?;
        Ok(w)
    }

    pub fn info(&self) -> &Info {
        &self.info
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The settings videos are encoded with (for videos encoded while recording, handed to
    /// [`save_episode_with_videos`](Self::save_episode_with_videos)).
    pub fn encoder(&self) -> &EncoderConfig {
        &self.encoder
    }

    /// Frames buffered for the episode being recorded.
    pub fn pending_frames(&self) -> usize {
        self.buffer.len()
    }

    /// Buffers one frame of the current episode, checking it against the feature spec.
    pub fn add_frame(&mut self, frame: FrameData) -> Result<()> {
        for (name, f) in self.info.features.iter() {
            if crate::meta::DEFAULT_FEATURE_NAMES.contains(&name) {
                continue;
            }
            if f.is_camera() {
                // A video camera may come pre-encoded instead (`save_episode_with_videos`).
                let Some(img) = frame.images.get(name) else {
                    if f.is_video() {
                        continue;
                    }
                    return Err(DatasetError::Usage(format!("frame lacks camera {name:?}")));
                };
                let (h, w) = f.hw().unwrap_or_default();
                if img.dimensions() != (w as u32, h as u32) {
                    return Err(DatasetError::Usage(format!(
                        "camera {name:?}: frame is {:?}, feature is {w}x{h}",
                        img.dimensions()
                    )));
                }
            } else {
                let v = frame
                    .values
                    .get(name)
                    .ok_or_else(|| DatasetError::Usage(format!("frame lacks feature {name:?}")))?;
                if v.len() != f.numel() {
                    return Err(DatasetError::Usage(format!(
                        "feature {name:?}: {} values, shape {:?}",
                        v.len(),
                        f.shape
                    )));
                }
            }
        }
        self.buffer.push(frame);
        Ok(())
    }

    /// Discards the frames buffered so far.
    pub fn clear_episode(&mut self) {
        self.buffer.clear();
    }

    fn write_info(&self) -> Result<()> {
        let path = self.root.join("meta/info.json");
        let text =
            serde_json::to_string_pretty(&self.info).map_err(|source| DatasetError::Json {
                path: path.clone(),
                source,
            })?;
        write_atomic(&path, |tmp| std::fs::write(tmp, text).map_err(io_err(tmp)))
    }

    fn data_schema(&self) -> Result<Arc<Schema>> {
        let mut fields = Vec::new();
        for (name, f) in self.info.features.iter() {
            if f.is_video() {
                continue;
            }
            let dt = if f.is_image() {
                DataType::Struct(
                    vec![
                        Field::new("bytes", DataType::Binary, true),
                        Field::new("path", DataType::Utf8, true),
                    ]
                    .into(),
                )
            } else if f.numel() == 1 {
                arrow_type(&f.dtype)?
            } else {
                DataType::FixedSizeList(
                    Arc::new(Field::new("element", arrow_type(&f.dtype)?, true)),
                    f.numel() as i32,
                )
            };
            fields.push(Field::new(name, dt, true));
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    /// One column of the episode's data batch.
    fn column(
        &self,
        name: &str,
        f: &Feature,
        frames: &[FrameData],
        defaults: &BTreeMap<&str, Vec<f64>>,
    ) -> Result<ArrayRef> {
        if f.is_image() {
            let mut bytes = Vec::with_capacity(frames.len());
            for (i, fr) in frames.iter().enumerate() {
                let mut png = Vec::new();
                fr.images[name]
                    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .map_err(|e| {
                        DatasetError::Usage(format!("PNG encode of {name:?} frame {i}: {e}"))
                    })?;
                bytes.push(png);
            }
            let paths: Vec<String> = (0..frames.len())
                .map(|i| format!("frame-{i:06}.png"))
                .collect();
            let b: ArrayRef = Arc::new(BinaryArray::from_iter_values(bytes.iter()));
            let p: ArrayRef = Arc::new(StringArray::from_iter_values(paths));
            return Ok(Arc::new(StructArray::from(vec![
                (Arc::new(Field::new("bytes", DataType::Binary, true)), b),
                (Arc::new(Field::new("path", DataType::Utf8, true)), p),
            ])));
        }
        let flat: Vec<f64> = match defaults.get(name) {
            Some(v) => v.clone(),
            None => frames
                .iter()
                .flat_map(|fr| fr.values[name].to_f64())
                .collect(),
        };
        let values: ArrayRef = match arrow_type(&f.dtype)? {
            DataType::Float32 => Arc::new(Float32Array::from_iter_values(
                flat.iter().map(|&x| x as f32),
            )),
            DataType::Float64 => Arc::new(Float64Array::from(flat)),
            DataType::Int64 => {
                Arc::new(Int64Array::from_iter_values(flat.iter().map(|&x| x as i64)))
            }
            DataType::Int32 => {
                Arc::new(Int32Array::from_iter_values(flat.iter().map(|&x| x as i32)))
            }
            DataType::Boolean => Arc::new(BooleanArray::from(
                flat.iter().map(|&x| x != 0.0).collect::<Vec<_>>(),
            )),
            _ => Arc::new(StringArray::from_iter_values(frames.iter().map(
                |fr| match &fr.values[name] {
                    FeatureValue::Text(s) => s.clone(),
                    _ => String::new(),
                },
            ))),
        };
        if f.numel() == 1 {
            return Ok(values);
        }
        let item = Arc::new(Field::new("element", values.data_type().clone(), true));
        FixedSizeListArray::try_new(item, f.numel() as i32, values, None)
            .map(|a| Arc::new(a) as ArrayRef)
            .map_err(|e| DatasetError::Usage(format!("feature {name:?}: {e}")))
    }

    /// Writes the buffered frames as the next episode; returns its index.
    pub fn save_episode(&mut self) -> Result<usize> {
        self.save_episode_with_videos(BTreeMap::new(), Stats::new())
    }

    /// Like [`save_episode`](Self::save_episode), but video cameras listed in `videos` take that
    /// already-encoded mp4 (one episode, `fps`, stream-copied, never re-encoded) instead of the
    /// frames' images, with their stats from `camera_stats` (the v2.1 converter's path).
    pub fn save_episode_with_videos(
        &mut self,
        videos: BTreeMap<String, PathBuf>,
        camera_stats: Stats,
    ) -> Result<usize> {
        if self.buffer.is_empty() {
            return Err(DatasetError::Usage("save_episode with no frames".into()));
        }
        let frames = std::mem::take(&mut self.buffer);
        let ep = self.info.total_episodes;
        let len = frames.len();
        let from = self.info.total_frames;
        let fps = self.info.fps;
        let mut ep_tasks: Vec<String> = Vec::new();
        let mut task_idx = Vec::with_capacity(len);
        for fr in &frames {
            let i = match self.tasks.iter().position(|t| *t == fr.task) {
                Some(i) => i,
                None => {
                    self.tasks.push(fr.task.clone());
                    self.tasks.len() - 1
                }
            };
            task_idx.push(i as f64);
            if !ep_tasks.contains(&fr.task) {
                ep_tasks.push(fr.task.clone());
            }
        }
        let defaults: BTreeMap<&str, Vec<f64>> = BTreeMap::from([
            (
                "timestamp",
                (0..len).map(|i| f64::from(i as f32 / fps as f32)).collect(),
            ),
            ("frame_index", (0..len).map(|i| i as f64).collect()),
            ("episode_index", vec![ep as f64; len]),
            ("index", (from..from + len).map(|i| i as f64).collect()),
            ("task_index", task_idx),
        ]);

        // Per-episode stats for every feature (cameras from the frames before encoding).
        let mut ep_stats = Stats::new();
        for (name, f) in self.info.features.iter() {
            let st = if let Some(st) = camera_stats.get(name).filter(|_| f.is_camera()) {
                Some(st.clone())
            } else if f.is_video() && videos.contains_key(name) {
                None
            } else if f.is_camera() {
                let step = stats::sample_step(len);
                let sampled = frames
                    .iter()
                    .step_by(step)
                    .map(|fr| fr.images.get(name))
                    .collect::<Option<Vec<&RgbImage>>>()
                    .ok_or_else(|| {
                        DatasetError::Usage(format!(
                            "camera {name:?}: frames without images and no video given"
                        ))
                    })?;
                FeatureStats::compute_rgb(&sampled)
            } else if f.dtype == "string" {
                None
            } else {
                let samples: Vec<Vec<f64>> = match defaults.get(name) {
                    Some(v) => v.iter().map(|&x| vec![x]).collect(),
                    None => frames.iter().map(|fr| fr.values[name].to_f64()).collect(),
                };
                FeatureStats::compute(&samples, false)
            };
            if let Some(st) = st {
                ep_stats.insert(name.to_string(), st);
            }
        }

        let data_loc = self.write_episode_data(&frames, &defaults)?;

        // Videos: encode the episode alone, then start a new file or stream-copy it onto the current one.
        let mut video_locs = BTreeMap::new();
        let video_keys: Vec<String> = self.videos.keys().cloned().collect();
        for key in video_keys {
            let source = match videos.get(&key) {
                Some(src) => EpisodeVideo::Encoded(src),
                None => EpisodeVideo::Frames(
                    frames
                        .iter()
                        .map(|fr| fr.images.get(&key).cloned())
                        .collect::<Option<_>>()
                        .ok_or_else(|| {
                            DatasetError::Usage(format!(
                                "camera {key:?}: frames without images and no video given"
                            ))
                        })?,
                ),
            };
            let loc = self.append_episode_video(&key, ep, len, source)?;
            video_locs.insert(key, loc);
        }

        self.write_episode_meta(EpisodeRow {
            episode_index: ep,
            tasks: ep_tasks,
            length: len,
            data: data_loc,
            from,
            videos: video_locs,
            stats: ep_stats,
            meta: (0, 0),
        })?;

        // Commit point.
        self.info.total_episodes += 1;
        self.info.total_frames += len;
        self.info.total_tasks = self.tasks.len();
        self.info.splits =
            serde_json::json!({ "train": format!("0:{}", self.info.total_episodes) });
        self.write_info()?;
        Ok(ep)
    }

    /// Appends the episode's rows to the current data parquet (one row group per episode),
    /// first rolling over to the next file by LeRobot's size estimate; returns
    /// `(chunk, file)`.
    fn write_episode_data(
        &mut self,
        frames: &[FrameData],
        defaults: &BTreeMap<&str, Vec<f64>>,
    ) -> Result<(usize, usize)> {
        let len = frames.len();
        // Data parquet: roll over by LeRobot's size estimate, then rewrite the current file.
        let schema = self.data_schema()?;
        let columns = self
            .info
            .features
            .iter()
            .filter(|(_, f)| !f.is_video())
            .map(|(n, f)| self.column(n, f, frames, defaults))
            .collect::<Result<Vec<_>>>()?;
        let batch = RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| DatasetError::Usage(e.to_string()))?;
        let data_path = |c: &Cursor| -> Result<PathBuf> {
            Ok(self.root.join(format_path(
                &self.info.data_path,
                &[("chunk_index", c.chunk), ("file_index", c.file)],
                &[],
            )?))
        };
        if self.data.open {
            let size = file_mb(&data_path(&self.data)?);
            let per_frame = size / self.data.frames.max(1) as f64;
            if size + per_frame * len as f64 >= self.info.data_files_size_in_mb {
                self.data.advance(self.info.chunks_size);
                self.data_batches.clear();
            }
        }
        self.data_batches.push(batch);
        write_parquet(&data_path(&self.data)?, schema, &self.data_batches)?;
        self.data.open = true;
        self.data.frames += len;
        Ok((self.data.chunk, self.data.file))
    }

    /// Writes the episode's meta/episodes row (rolling over on the data size knob, like
    /// LeRobot), the tasks and the aggregated stats.json; info.json, the commit point, is left
    /// to the caller.
    fn write_episode_meta(&mut self, row: EpisodeRow) -> Result<()> {
        // meta/episodes row (rolls over on the data size knob, like LeRobot).
        if self.meta.open {
            let size = file_mb(&self.root.join(format_path(
                DEFAULT_EPISODES_PATH,
                &[
                    ("chunk_index", self.meta.chunk),
                    ("file_index", self.meta.file),
                ],
                &[],
            )?));
            if size + size / self.meta_rows.len().max(1) as f64 >= self.info.data_files_size_in_mb {
                self.meta.advance(self.info.chunks_size);
                self.meta_rows.clear();
            }
        }
        let ep_stats = row.stats.clone();
        self.meta_rows.push(EpisodeRow {
            meta: (self.meta.chunk, self.meta.file),
            ..row
        });
        self.write_meta_episodes()?;
        self.meta.open = true;
        self.write_tasks()?;
        self.stats.push(ep_stats);
        let agg = stats::aggregate(&self.stats.iter().collect::<Vec<_>>());
        let stats_path = self.root.join("meta/stats.json");
        let text = serde_json::to_string_pretty(&stats::to_json(&agg)).map_err(|source| {
            DatasetError::Json {
                path: stats_path.clone(),
                source,
            }
        })?;
        write_atomic(&stats_path, |tmp| {
            std::fs::write(tmp, text).map_err(io_err(tmp))
        })?;

        Ok(())
    }

    /// Appends one episode's video to camera `key`'s current file (or starts the next file by
    /// LeRobot's size rule) and returns where its frames are. The span is measured, not
    /// assumed: `from_timestamp` is the presentation time of the episode's first frame in the
    /// file as decoders see it, and every one of its frames must sit at `from + i / fps` within
    /// LeRobot's tolerance, or the save fails (a dataset LeRobot cannot read is never committed).
    fn append_episode_video(
        &mut self,
        key: &str,
        ep: usize,
        len: usize,
        source: EpisodeVideo<'_>,
    ) -> Result<VideoLoc> {
        let fps = f64::from(self.info.fps);
        let template = self
            .info
            .video_path
            .clone()
            .unwrap_or_else(|| DEFAULT_VIDEO_PATH.into());
        let root = self.root.clone();
        let path_of = |c: &Cursor| -> Result<PathBuf> {
            Ok(root.join(format_path(
                &template,
                &[("chunk_index", c.chunk), ("file_index", c.file)],
                &[("video_key", key)],
            )?))
        };
        let ep_tmp = self.root.join(format!("videos/{key}/.episode-{ep:06}.mp4"));
        std::fs::create_dir_all(ep_tmp.parent().unwrap_or(&self.root)).map_err(io_err(&ep_tmp))?;
        match source {
            EpisodeVideo::Encoded(src) => {
                std::fs::copy(src, &ep_tmp).map_err(io_err(src))?;
            }
            EpisodeVideo::Frames(imgs) => {
                video::encode_frames(&imgs, self.info.fps, &self.encoder, &ep_tmp)?
            }
        }
        let video_files_size_in_mb = self.info.video_files_size_in_mb;
        let chunks_size = self.info.chunks_size;
        let cur = self
            .videos
            .get_mut(key)
            .ok_or_else(|| DatasetError::Usage(key.to_string()))?;
        if cur.open && file_mb(&path_of(cur)?) + file_mb(&ep_tmp) >= video_files_size_in_mb {
            cur.advance(chunks_size);
        }
        let target = path_of(cur)?;
        // Where the episode's first frame should land: right after the frames already there.
        let expected_from = cur.frames as f64 / fps;
        if cur.open {
            let joined = ep_tmp.with_extension("joined.mp4");
            let parts = [
                video::ConcatPart {
                    path: &target,
                    duration_s: Some(expected_from),
                },
                video::ConcatPart {
                    path: &ep_tmp,
                    duration_s: None,
                },
            ];
            video::concat_files(&parts, &joined)?;
            write_atomic(&target, |tmp| {
                std::fs::rename(&joined, tmp).map_err(io_err(tmp))
            })?;
            let _ = std::fs::remove_file(&ep_tmp);
        } else {
            write_atomic(&target, |tmp| {
                std::fs::rename(&ep_tmp, tmp).map_err(io_err(tmp))
            })?;
        }
        let from_ts = measured_span_start(&target, ep, key, expected_from, len, fps)?;
        cur.open = true;
        cur.frames += len;
        let loc = VideoLoc {
            chunk: cur.chunk,
            file: cur.file,
            from_ts,
            to_ts: from_ts + len as f64 / fps,
        };
        if ep == 0 {
            self.set_video_info(key, &target)?;
        }
        Ok(loc)
    }

    fn set_video_info(&mut self, key: &str, path: &Path) -> Result<()> {
        let p = video::probe(path)?;
        let enc = &self.encoder;
        let info = serde_json::json!({
            "video.height": p.height, "video.width": p.width, "video.codec": p.codec, "video.pix_fmt": p.pix_fmt,
            "video.fps": self.info.fps, "video.channels": 3, "has_audio": false,
            "video.g": enc.g, "video.crf": enc.crf, "video.preset": enc.preset, "video.fast_decode": 0,
            "video.video_backend": "pyav", "video.extra_options": {}, "is_depth_map": false,
        });
        if let Some((_, f)) = self.info.features.0.iter_mut().find(|(k, _)| k == key) {
            f.info = Some(info);
        }
        Ok(())
    }

    fn write_tasks(&self) -> Result<()> {
        let pandas = serde_json::json!({
            "index_columns": ["task"],
            "column_indexes": [{"name": null, "field_name": null, "pandas_type": "unicode", "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
            "columns": [
                {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": null},
                {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": null}],
            "attributes": {}, "creator": {"library": "pyarrow", "version": "21.0.0"}, "pandas_version": "2.3.3",
        });
        let schema = Arc::new(Schema::new_with_metadata(
            vec![
                Field::new("task_index", DataType::Int64, true),
                Field::new("task", DataType::Utf8, true),
            ],
            [("pandas".to_string(), pandas.to_string())].into(),
        ));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..self.tasks.len() as i64)),
                Arc::new(StringArray::from_iter_values(&self.tasks)),
            ],
        )
        .map_err(|e| DatasetError::Usage(e.to_string()))?;
        write_parquet(&self.root.join(DEFAULT_TASKS_PATH), schema, &[batch])
    }

    fn write_meta_episodes(&self) -> Result<()> {
        let rows = &self.meta_rows;
        let mut fields: Vec<Field> = Vec::new();
        let mut cols: Vec<ArrayRef> = Vec::new();
        let push_int =
            |fields: &mut Vec<Field>, cols: &mut Vec<ArrayRef>, name: String, v: Vec<i64>| {
                fields.push(Field::new(name, DataType::Int64, true));
                cols.push(Arc::new(Int64Array::from(v)));
            };
        push_int(
            &mut fields,
            &mut cols,
            "episode_index".into(),
            rows.iter().map(|r| r.episode_index as i64).collect(),
        );
        let mut tasks = ListBuilder::new(StringBuilder::new());
        for r in rows {
            for t in &r.tasks {
                tasks.values().append_value(t);
            }
            tasks.append(true);
        }
        let tasks = tasks.finish();
        fields.push(Field::new("tasks", tasks.data_type().clone(), true));
        cols.push(Arc::new(tasks));
        push_int(
            &mut fields,
            &mut cols,
            "length".into(),
            rows.iter().map(|r| r.length as i64).collect(),
        );
        push_int(
            &mut fields,
            &mut cols,
            "data/chunk_index".into(),
            rows.iter().map(|r| r.data.0 as i64).collect(),
        );
        push_int(
            &mut fields,
            &mut cols,
            "data/file_index".into(),
            rows.iter().map(|r| r.data.1 as i64).collect(),
        );
        push_int(
            &mut fields,
            &mut cols,
            "dataset_from_index".into(),
            rows.iter().map(|r| r.from as i64).collect(),
        );
        push_int(
            &mut fields,
            &mut cols,
            "dataset_to_index".into(),
            rows.iter().map(|r| (r.from + r.length) as i64).collect(),
        );
        for key in self.videos.keys() {
            let v = |r: &EpisodeRow| r.videos.get(key).copied().unwrap_or_default();
            push_int(
                &mut fields,
                &mut cols,
                format!("videos/{key}/chunk_index"),
                rows.iter().map(|r| v(r).chunk as i64).collect(),
            );
            push_int(
                &mut fields,
                &mut cols,
                format!("videos/{key}/file_index"),
                rows.iter().map(|r| v(r).file as i64).collect(),
            );
            for (from, s) in [(true, "from_timestamp"), (false, "to_timestamp")] {
                fields.push(Field::new(
                    format!("videos/{key}/{s}"),
                    DataType::Float64,
                    true,
                ));
                cols.push(Arc::new(Float64Array::from_iter_values(
                    rows.iter()
                        .map(|r| if from { v(r).from_ts } else { v(r).to_ts }),
                )));
            }
        }
        // stats/<feature>/<stat>: list<double> (vectors), list<list<list<double>>> (cameras), list<int64> (count).
        for (name, f) in self.info.features.iter() {
            if !rows.iter().all(|r| r.stats.contains_key(name)) {
                continue;
            }
            let names: Vec<&str> = ["min", "max", "mean", "std"]
                .into_iter()
                .chain(QUANTILES.iter().map(|(q, _)| *q))
                .collect();
            for stat in names
                .iter()
                .take(4)
                .copied()
                .chain(["count"])
                .chain(names.iter().skip(4).copied())
            {
                let get = |r: &EpisodeRow| -> Vec<f64> {
                    let s = &r.stats[name];
                    match stat {
                        "min" => s.min.clone(),
                        "max" => s.max.clone(),
                        "mean" => s.mean.clone(),
                        "std" => s.std.clone(),
                        q => s.quantiles.get(q).cloned().unwrap_or_default(),
                    }
                };
                let arr: ArrayRef = if stat == "count" {
                    let mut b = ListBuilder::new(Int64Builder::new());
                    for r in rows {
                        b.values().append_value(r.stats[name].count as i64);
                        b.append(true);
                    }
                    Arc::new(b.finish())
                } else if f.is_camera() {
                    let mut b =
                        ListBuilder::new(ListBuilder::new(ListBuilder::new(Float64Builder::new())));
                    for r in rows {
                        for x in get(r) {
                            b.values().values().values().append_value(x);
                            b.values().values().append(true);
                            b.values().append(true);
                        }
                        b.append(true);
                    }
                    Arc::new(b.finish())
                } else {
                    let mut b = ListBuilder::new(Float64Builder::new());
                    for r in rows {
                        b.values().append_slice(&get(r));
                        b.append(true);
                    }
                    Arc::new(b.finish())
                };
                fields.push(Field::new(
                    format!("stats/{name}/{stat}"),
                    arr.data_type().clone(),
                    true,
                ));
                cols.push(arr);
            }
        }
        push_int(
            &mut fields,
            &mut cols,
            "meta/episodes/chunk_index".into(),
            rows.iter().map(|r| r.meta.0 as i64).collect(),
        );
        push_int(
            &mut fields,
            &mut cols,
            "meta/episodes/file_index".into(),
            rows.iter().map(|r| r.meta.1 as i64).collect(),
        );
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(schema.clone(), cols)
            .map_err(|e| DatasetError::Usage(e.to_string()))?;
        let path = self.root.join(format_path(
            DEFAULT_EPISODES_PATH,
            &[
                ("chunk_index", self.meta.chunk),
                ("file_index", self.meta.file),
            ],
            &[],
        )?);
        write_parquet(&path, schema, &[batch])
    }
}
