//! [`LeRobotDataset`]: random access to frames of a v3.0 or v2.1 dataset.
//!
//! Like LeRobot's `DatasetReader`, a frame is found through its episode's metadata row: global
//! `index` → episode (binary search over `[dataset_from_index, dataset_to_index)`) → data file →
//! row; cameras are then decoded from PNG bytes in that row (`image`) or from the episode's mp4 at
//! `from_timestamp + timestamp` (`video`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use image::RgbImage;

use crate::error::{inconsistent, DatasetError, Result};
use crate::meta::{self, Episode, Info, Version};
use crate::table::{self, FeatureValue};
use crate::video;

/// Data files kept decoded in memory (each up to `data_files_size_in_mb`, 100 MB by default).
const MAX_CACHED_FILES: usize = 8;

/// Video frames are decoded in blocks of this many consecutive episode frames and kept in
/// [`FrameCache`]. Through the CLI a block is one read from a long-lived `ffmpeg` (a new process
/// per miss costs ~80 ms, so each should bring many frames); in process a seek costs a keyframe
/// decode (LeRobot's g=2), so a miss decodes just the frame asked for: past the cache, random
/// access would otherwise decode a whole block to use one frame of it.
#[cfg(not(feature = "libav"))]
const VIDEO_BLOCK_FRAMES: usize = 32;
#[cfg(feature = "libav")]
const VIDEO_BLOCK_FRAMES: usize = 1;

/// Long-lived decoders kept open: an idle `ffmpeg` blocked on its pipe per (camera, episode)
/// through the CLI, an open file with its decoder per video file in process. With the frame
/// cache they bound the reader's memory.
const MAX_LIVE_STREAMS: usize = 4;

/// Default decoder threads per open video file (libav; `ZK0_DATASET_DECODE_THREADS`). One: a
/// random read seeks, and every extra frame thread adds a frame of latency after each seek that
/// is decoded for nothing; on the 2-core bench machine one thread was faster on both patterns
/// (docs/benchmarks.md, "Dataset reader").
#[cfg(feature = "libav")]
const DEFAULT_DECODE_THREADS: usize = 1;

/// Default bound of the decoded-frame cache; `ZK0_DATASET_FRAME_CACHE_MB` overrides it.
const DEFAULT_FRAME_CACHE_BYTES: usize = 1 << 30;

/// Decoded video blocks keyed by `(camera, episode, block)`, least recently used evicted first
/// once the total size passes `max_bytes`.
#[derive(Debug, Default)]
struct FrameCache {
    blocks: HashMap<BlockKey, (Arc<Vec<RgbImage>>, u64)>,
    /// Last use → key: the eviction order.
    order: BTreeMap<u64, BlockKey>,
    bytes: usize,
    max_bytes: usize,
    clock: u64,
}

type BlockKey = (String, usize, usize);

fn block_bytes(block: &[RgbImage]) -> usize {
    block.iter().map(|f| f.as_raw().len()).sum()
}

impl FrameCache {
    fn new(max_bytes: usize) -> Self {
        FrameCache {
            max_bytes,
            ..Default::default()
        }
    }

    fn get(&mut self, key: &BlockKey) -> Option<Arc<Vec<RgbImage>>> {
        self.clock += 1;
        let clock = self.clock;
        let (b, used) = self.blocks.get_mut(key)?;
        self.order.remove(used);
        *used = clock;
        self.order.insert(clock, key.clone());
        Some(b.clone())
    }

    fn insert(&mut self, key: BlockKey, block: Arc<Vec<RgbImage>>) {
        let size = block_bytes(&block);
        if size > self.max_bytes {
            return;
        }
        if let Some((old, used)) = self.blocks.remove(&key) {
            self.order.remove(&used);
            self.bytes -= block_bytes(&old);
        }
        while self.bytes + size > self.max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((b, _)) = self.blocks.remove(&oldest) {
                self.bytes -= block_bytes(&b);
            }
        }
        self.clock += 1;
        self.order.insert(self.clock, key.clone());
        self.blocks.insert(key, (block, self.clock));
        self.bytes += size;
    }
}

/// One frame: its bookkeeping columns, every non-camera feature, and decoded cameras.
#[derive(Debug, Clone)]
pub struct Frame {
    pub index: usize,
    pub episode_index: usize,
    pub frame_index: usize,
    /// Seconds since the episode start (`frame_index / fps`, stored as float32).
    pub timestamp: f32,
    pub task_index: usize,
    pub task: String,
    /// Every non-camera feature present in the data file, defaults included.
    pub features: BTreeMap<String, FeatureValue>,
    /// Camera key → RGB frame (empty when read without images).
    pub images: BTreeMap<String, RgbImage>,
}

impl Frame {
    /// The `dataset show --json` shape: `{"episode_index", "frame_index", "index", "timestamp",
    /// "task", "features": {name: [values]}, "images": {camera: {"mean_rgb": [r, g, b]}}}`.
    pub fn to_show_json(&self) -> serde_json::Value {
        let features: serde_json::Map<String, serde_json::Value> = self
            .features
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json_list()))
            .collect();
        let images: serde_json::Map<String, serde_json::Value> = self
            .images
            .iter()
            .map(|(k, img)| {
                (
                    k.clone(),
                    serde_json::json!({ "mean_rgb": video::mean_rgb(img) }),
                )
            })
            .collect();
        serde_json::json!({
            "episode_index": self.episode_index,
            "frame_index": self.frame_index,
            "index": self.index,
            "timestamp": self.timestamp,
            "task": self.task,
            "features": features,
            "images": images,
        })
    }
}

/// A training sample: the frame at `index` plus, per queried feature, the values at
/// `t + k/fps` for each requested offset, clamped to the episode, with padding flags
/// (LeRobot's `delta_timestamps`, `<key>_is_pad`).
#[derive(Debug, Clone)]
pub struct DeltaSample {
    pub frame: Frame,
    /// Non-camera feature → one value per offset.
    pub values: BTreeMap<String, Vec<FeatureValue>>,
    /// Camera → one frame per offset.
    pub images: BTreeMap<String, Vec<RgbImage>>,
    /// Feature → `true` where the offset fell outside the episode (value repeated from the edge).
    pub is_pad: BTreeMap<String, Vec<bool>>,
}

/// A camera's frames located in a video file (see `LeRobotDataset::video_source`).
struct VideoSource {
    path: PathBuf,
    /// Time of the first wanted frame in the file.
    time_s: f64,
    width: usize,
    height: usize,
}

/// An opened dataset. Cheap to share across threads (`Arc<LeRobotDataset>`); data files are
/// loaded on first use and cached.
#[derive(Debug)]
pub struct LeRobotDataset {
    root: PathBuf,
    version: Version,
    info: Info,
    tasks: Vec<String>,
    episodes: Vec<Episode>,
    stats: Option<serde_json::Value>,
    cache: Mutex<HashMap<PathBuf, Arc<RecordBatch>>>,
    frames: Mutex<FrameCache>,
    /// `(camera, episode)` → a decoder positioned at the start of block `.1`; `.2` last use.
    #[cfg(not(feature = "libav"))]
    streams: Mutex<HashMap<(String, usize), (video::FrameStream, usize, u64)>>,
    /// Open video files, least recently used first.
    #[cfg(feature = "libav")]
    decoders: Mutex<Vec<crate::libav::Decoder>>,
    /// libav decoder threads per file (0: one per core).
    #[cfg(feature = "libav")]
    decode_threads: std::sync::atomic::AtomicUsize,
    /// Each video file's frame presentation times (one `ffprobe` per file), for the
    /// timestamp check of every decode.
    frame_times: Mutex<HashMap<PathBuf, Arc<Vec<f64>>>>,
}

impl LeRobotDataset {
    /// Opens a dataset directory (v3.0 or v2.1), loading and cross-checking its metadata.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let info = Info::load(&root)?;
        let version = info.version(&root.join("meta/info.json"))?;
        let (tasks, episodes, stats) = match version {
            Version::V30 => (
                meta::load_tasks_v3(&root)?,
                meta::load_episodes_v3(&root, &info)?,
                meta::load_stats(&root)?,
            ),
            Version::V21 => (
                meta::load_tasks_v21(&root)?,
                meta::load_episodes_v21(&root, &info)?,
                meta::load_stats(&root)?,
            ),
        };
        // info.json is the writer's commit point: rows and tasks past its totals belong to an
        // episode whose save was interrupted, and are not part of the dataset.
        let (mut tasks, mut episodes) = (tasks, episodes);
        episodes.retain(|e| e.episode_index < info.total_episodes);
        if tasks.len() > info.total_tasks {
            tasks.truncate(info.total_tasks);
        }
        let ds = LeRobotDataset {
            root,
            version,
            info,
            tasks,
            episodes,
            stats,
            cache: Mutex::new(HashMap::new()),
            frames: Mutex::new(FrameCache::new(
                std::env::var("ZK0_DATASET_FRAME_CACHE_MB")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .map_or(DEFAULT_FRAME_CACHE_BYTES, |mb| mb << 20),
            )),
            #[cfg(not(feature = "libav"))]
            streams: Mutex::new(HashMap::new()),
            #[cfg(feature = "libav")]
            decoders: Mutex::new(Vec::new()),
            #[cfg(feature = "libav")]
            decode_threads: std::sync::atomic::AtomicUsize::new(
                std::env::var("ZK0_DATASET_DECODE_THREADS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(DEFAULT_DECODE_THREADS),
            ),
            frame_times: Mutex::new(HashMap::new()),
        };
        ds.check_metadata()?;
        Ok(ds)
    }

    /// Bounds the decoded-video-frame cache (bytes; 0 disables it). A miss decodes the block of
    /// [`VIDEO_BLOCK_FRAMES`] frames holding the request (the frame alone in process) and keeps
    /// it here, so repeated requests (delta-timestamp windows, several epochs) decode nothing.
    pub fn set_frame_cache_bytes(&self, max_bytes: usize) {
        if let Ok(mut c) = self.frames.lock() {
            *c = FrameCache::new(max_bytes);
        }
    }

    /// Decoder threads per open video file (default [`DEFAULT_DECODE_THREADS`]; 0: one per
    /// core; `ZK0_DATASET_DECODE_THREADS` sets it at open). Only the in-process decoder (feature
    /// `libav`) has the setting; the files open now are closed, to reopen with it.
    #[cfg(feature = "libav")]
    pub fn set_decode_threads(&self, threads: usize) {
        self.decode_threads
            .store(threads, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut d) = self.decoders.lock() {
            d.clear();
        }
    }

    /// Metadata-only consistency: episode numbering, contiguous index ranges, totals.
    fn check_metadata(&self) -> Result<()> {
        let info_path = self.root.join("meta/info.json");
        let meta_path = match self.version {
            Version::V30 => self.root.join("meta/episodes"),
            Version::V21 => self.root.join("meta/episodes.jsonl"),
        };
        let mut next = 0;
        for (i, ep) in self.episodes.iter().enumerate() {
            let err = |m: String| DatasetError::Episode {
                path: meta_path.clone(),
                episode: ep.episode_index,
                message: m,
            };
            if ep.episode_index != i {
                return Err(err(format!(
                    "episode indices are not 0..{}: found {} at position {i}",
                    self.episodes.len(),
                    ep.episode_index
                )));
            }
            if ep.dataset_from_index != next
                || ep.dataset_to_index != ep.dataset_from_index + ep.length
            {
                return Err(err(format!(
                    "index range [{}, {}) does not continue at {next} with length {}",
                    ep.dataset_from_index, ep.dataset_to_index, ep.length
                )));
            }
            next = ep.dataset_to_index;
        }
        if self.episodes.len() != self.info.total_episodes {
            return Err(inconsistent(
                &info_path,
                format!(
                    "total_episodes is {} but the metadata lists {} episodes",
                    self.info.total_episodes,
                    self.episodes.len()
                ),
            ));
        }
        if next != self.info.total_frames {
            return Err(inconsistent(
                &info_path,
                format!(
                    "total_frames is {} but the episodes add up to {next}",
                    self.info.total_frames
                ),
            ));
        }
        if self.tasks.len() != self.info.total_tasks {
            return Err(inconsistent(
                &info_path,
                format!(
                    "total_tasks is {} but there are {} tasks",
                    self.info.total_tasks,
                    self.tasks.len()
                ),
            ));
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn version(&self) -> Version {
        self.version
    }
    pub fn info(&self) -> &Info {
        &self.info
    }
    pub fn fps(&self) -> u32 {
        self.info.fps
    }
    /// Task strings indexed by `task_index`.
    pub fn tasks(&self) -> &[String] {
        &self.tasks
    }
    pub fn episodes(&self) -> &[Episode] {
        &self.episodes
    }
    /// `meta/stats.json` (v3.0; v2.0), if present.
    pub fn stats(&self) -> Option<&serde_json::Value> {
        self.stats.as_ref()
    }
    /// Number of frames.
    pub fn len(&self) -> usize {
        self.episodes.last().map_or(0, |e| e.dataset_to_index)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Camera feature keys (video and image), in info.json order.
    pub fn camera_keys(&self) -> Vec<String> {
        self.info
            .features
            .cameras()
            .map(|(k, _)| k.to_string())
            .collect()
    }

    pub fn episode(&self, episode: usize) -> Result<&Episode> {
        self.episodes
            .get(episode)
            .ok_or_else(|| DatasetError::OutOfRange {
                what: "episode",
                value: episode,
                bound: format!("dataset has {} episodes", self.episodes.len()),
            })
    }

    /// The episode containing global frame `index`.
    pub fn episode_of(&self, index: usize) -> Result<&Episode> {
        let pos = self
            .episodes
            .partition_point(|e| e.dataset_to_index <= index);
        self.episodes
            .get(pos)
            .filter(|e| index >= e.dataset_from_index)
            .ok_or_else(|| DatasetError::OutOfRange {
                what: "frame index",
                value: index,
                bound: format!("dataset has {} frames", self.len()),
            })
    }

    /// Global index of `(episode, frame_index)`.
    pub fn global_index(&self, episode: usize, frame_index: usize) -> Result<usize> {
        let ep = self.episode(episode)?;
        if frame_index >= ep.length {
            return Err(DatasetError::OutOfRange {
                what: "frame",
                value: frame_index,
                bound: format!("episode {episode} has {} frames", ep.length),
            });
        }
        Ok(ep.dataset_from_index + frame_index)
    }

    /// The whole data file holding an episode, cached.
    fn data_file(&self, ep: &Episode) -> Result<Arc<RecordBatch>> {
        let path = self.root.join(&ep.data_path);
        if let Some(b) = self
            .cache
            .lock()
            .map_err(|_| inconsistent(&path, "cache lock poisoned"))?
            .get(&path)
        {
            return Ok(b.clone());
        }
        if !path.exists() {
            return Err(DatasetError::Episode {
                path,
                episode: ep.episode_index,
                message: "data file is missing".into(),
            });
        }
        let batch = Arc::new(table::read_parquet(&path)?);
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| inconsistent(&path, "cache lock poisoned"))?;
        // Bounded: a long random-access run over a many-file dataset must not hold every file.
        if cache.len() >= MAX_CACHED_FILES {
            if let Some(k) = cache.keys().next().cloned() {
                cache.remove(&k);
            }
        }
        cache.insert(path, batch.clone());
        Ok(batch)
    }

    /// Row of global `index` inside its data file. Rows of a file are in `index` order and an
    /// episode never spans files, so the row is an offset from the file's first index; the
    /// `index` column is checked rather than trusted.
    fn locate_row(&self, ep: &Episode, index: usize) -> Result<(Arc<RecordBatch>, usize)> {
        let batch = self.data_file(ep)?;
        let path = self.root.join(&ep.data_path);
        let err = |m: String| DatasetError::Episode {
            path: path.clone(),
            episode: ep.episode_index,
            message: m,
        };
        if batch.num_rows() == 0 {
            return Err(err("data file has no rows".into()));
        }
        let first = table::int_cell(&batch, "index", 0, &path)?;
        let guess = (index as i64 - first).max(0) as usize;
        if guess < batch.num_rows()
            && table::int_cell(&batch, "index", guess, &path)? == index as i64
        {
            return Ok((batch, guess));
        }
        let col = table::column(&batch, "index", &path)?;
        for row in 0..batch.num_rows() {
            if table::cell_value(col.as_ref(), row) == Some(FeatureValue::Int(vec![index as i64])) {
                return Ok((batch.clone(), row));
            }
        }
        Err(err(format!("no row with index {index}")))
    }

    /// The frame at global `index` with every camera decoded.
    pub fn get(&self, index: usize) -> Result<Frame> {
        let mut frame = self.get_values(index)?;
        let ep = self.episode_of(index)?.clone();
        for key in self.camera_keys() {
            let img = self.decode_camera(&ep, &key, index, Some(frame.timestamp))?;
            frame.images.insert(key, img);
        }
        Ok(frame)
    }

    /// The frame at `(episode, frame_index)` with every camera decoded.
    pub fn get_episode_frame(&self, episode: usize, frame_index: usize) -> Result<Frame> {
        self.get(self.global_index(episode, frame_index)?)
    }

    /// The frame at global `index` without decoding cameras (fast: parquet only).
    pub fn get_values(&self, index: usize) -> Result<Frame> {
        let ep = self.episode_of(index)?;
        let (batch, row) = self.locate_row(ep, index)?;
        let path = self.root.join(&ep.data_path);
        let int = |name: &str| -> Result<usize> {
            let v = table::int_cell(&batch, name, row, &path)?;
            usize::try_from(v).map_err(|_| DatasetError::Episode {
                path: path.clone(),
                episode: ep.episode_index,
                message: format!("negative {name} at row {row}"),
            })
        };
        let episode_index = int("episode_index")?;
        if episode_index != ep.episode_index {
            return Err(DatasetError::Episode {
                path: path.clone(),
                episode: ep.episode_index,
                message: format!("row {row} (index {index}) belongs to episode {episode_index}"),
            });
        }
        let task_index = int("task_index")?;
        let task = self
            .tasks
            .get(task_index)
            .cloned()
            .ok_or_else(|| DatasetError::Episode {
                path: path.clone(),
                episode: ep.episode_index,
                message: format!(
                    "task_index {task_index} at row {row} is not in the tasks table ({} tasks)",
                    self.tasks.len()
                ),
            })?;
        let mut features = BTreeMap::new();
        for (name, f) in self.info.features.iter() {
            if f.is_camera() {
                continue;
            }
            let Some(col) = batch.column_by_name(name) else {
                return Err(DatasetError::Episode {
                    path: path.clone(),
                    episode: ep.episode_index,
                    message: format!("feature {name:?} has no column"),
                });
            };
            let v = table::cell_value(col.as_ref(), row).ok_or_else(|| DatasetError::Episode {
                path: path.clone(),
                episode: ep.episode_index,
                message: format!(
                    "column {name:?} (type {}) at row {row} is not a supported value",
                    col.data_type()
                ),
            })?;
            features.insert(name.to_string(), v);
        }
        Ok(Frame {
            index,
            episode_index,
            frame_index: int("frame_index")?,
            timestamp: table::float_cell(&batch, "timestamp", row, &path)? as f32,
            task_index,
            task,
            features,
            images: BTreeMap::new(),
        })
    }

    /// Decodes one camera of the frame at `index` (`timestamp` from its row, when the caller
    /// has read it).
    fn decode_camera(
        &self,
        ep: &Episode,
        key: &str,
        index: usize,
        timestamp: Option<f32>,
    ) -> Result<RgbImage> {
        let f = self
            .info
            .features
            .get(key)
            .ok_or_else(|| DatasetError::Usage(format!("no feature {key:?}")))?;
        if f.is_image() {
            let (batch, row) = self.locate_row(ep, index)?;
            let path = self.root.join(&ep.data_path);
            let err = |m: String| DatasetError::Episode {
                path: path.clone(),
                episode: ep.episode_index,
                message: m,
            };
            let col = table::column(&batch, key, &path)?;
            let bytes = table::image_bytes(col.as_ref(), row)
                .ok_or_else(|| err(format!("image column {key:?} row {row} has no bytes")))?;
            let img = image::load_from_memory(bytes)
                .map_err(|e| err(format!("image {key:?} row {row}: {e}")))?;
            return Ok(img.to_rgb8());
        }
        self.video_frame(ep, key, index, timestamp)
    }

    /// Video camera `key` at global `index` through the block cache. The block holding the
    /// frame is decoded in one run from its first frame's timestamp, exactly like the sequential
    /// path ([`Self::decode_episode`]); frames of a block are consecutive stream frames.
    /// `timestamp` is the frame's own (read from its row when `None`).
    fn video_frame(
        &self,
        ep: &Episode,
        key: &str,
        index: usize,
        timestamp: Option<f32>,
    ) -> Result<RgbImage> {
        let time_of = |i: usize| match timestamp {
            Some(t) if i == index => Ok(t),
            _ => self.get_values(i).map(|f| f.timestamp),
        };
        let cache_on = self.frames.lock().map(|c| c.max_bytes > 0).unwrap_or(false);
        if !cache_on {
            let t = time_of(index)?;
            let mut frames = self.decode_video(ep, key, f64::from(t), 1)?;
            return frames
                .pop()
                .ok_or_else(|| DatasetError::Usage("no frame decoded".into()));
        }
        let fi = index - ep.dataset_from_index;
        let block = fi / VIDEO_BLOCK_FRAMES;
        let ck = (key.to_string(), ep.episode_index, block);
        let hit = self.frames.lock().ok().and_then(|mut c| c.get(&ck));
        let frames = match hit {
            Some(b) => b,
            None => {
                let start = block * VIDEO_BLOCK_FRAMES;
                let count = VIDEO_BLOCK_FRAMES.min(ep.length - start);
                let t0 = time_of(ep.dataset_from_index + start)?;
                let b = Arc::new(self.decode_block(ep, key, block, t0, count)?);
                if let Ok(mut c) = self.frames.lock() {
                    c.insert(ck, b.clone());
                }
                b
            }
        };
        frames
            .get(fi - block * VIDEO_BLOCK_FRAMES)
            .cloned()
            .ok_or_else(|| DatasetError::Usage("no frame decoded".into()))
    }

    /// Block `block` (`count` frames from episode time `t0`) of camera `key`, from a live
    /// `ffmpeg` that stopped right before it (sequential access: one run per episode) or from a
    /// new one that runs to the episode's end, kept for the blocks after this one.
    #[cfg(not(feature = "libav"))]
    fn decode_block(
        &self,
        ep: &Episode,
        key: &str,
        block: usize,
        t0: f32,
        count: usize,
    ) -> Result<Vec<RgbImage>> {
        let sk = (key.to_string(), ep.episode_index);
        let live = self
            .streams
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&sk))
            .filter(|(_, next, _)| *next == block);
        let mut stream = match live {
            Some((s, _, _)) => s,
            None => self.open_stream(ep, key, block * VIDEO_BLOCK_FRAMES, t0)?,
        };
        let b = stream.read(count)?;
        if stream.remaining() > 0 {
            if let Ok(mut m) = self.streams.lock() {
                let used = m.values().map(|v| v.2).max().unwrap_or(0) + 1;
                m.insert(sk, (stream, block + 1, used));
                while m.len() > MAX_LIVE_STREAMS {
                    let Some(oldest) = m.iter().min_by_key(|(_, v)| v.2).map(|(k, _)| k.clone())
                    else {
                        break;
                    };
                    m.remove(&oldest);
                }
            }
        }
        Ok(b)
    }

    /// Block `block` (`count` frames from episode time `t0`) of camera `key`: the file's open
    /// decoder continues or seeks (see [`crate::libav`]).
    #[cfg(feature = "libav")]
    fn decode_block(
        &self,
        ep: &Episode,
        key: &str,
        _block: usize,
        t0: f32,
        count: usize,
    ) -> Result<Vec<RgbImage>> {
        self.decode_video(ep, key, f64::from(t0), count)
    }

    /// A decoder over camera `key` of `ep` from episode frame `start` (at episode time `t0`) to
    /// the episode's end.
    #[cfg(not(feature = "libav"))]
    fn open_stream(
        &self,
        ep: &Episode,
        key: &str,
        start: usize,
        t0: f32,
    ) -> Result<video::FrameStream> {
        let src = self.video_source(ep, key, f64::from(t0), ep.length - start)?;
        video::FrameStream::open(
            &src.path,
            src.time_s,
            f64::from(self.info.fps),
            ep.length - start,
            src.width,
            src.height,
            ep.episode_index,
        )
    }

    /// `count` consecutive frames of video camera `key` from episode time `t` on, from the
    /// file's open decoder (opened if none is, the least recently used closed past
    /// [`MAX_LIVE_STREAMS`]).
    #[cfg(feature = "libav")]
    fn decode_video(&self, ep: &Episode, key: &str, t: f64, count: usize) -> Result<Vec<RgbImage>> {
        let src = self.video_source(ep, key, t, count)?;
        let open = self.decoders.lock().ok().and_then(|mut d| {
            let i = d.iter().position(|x| x.path() == src.path)?;
            Some(d.remove(i))
        });
        let mut dec = match open {
            Some(d) => d,
            None => crate::libav::Decoder::open(
                &src.path,
                self.decode_threads
                    .load(std::sync::atomic::Ordering::Relaxed),
            )?,
        };
        let frames = dec.frames(&self.frame_run(&src, count, ep))?;
        if let Ok(mut d) = self.decoders.lock() {
            d.push(dec);
            if d.len() > MAX_LIVE_STREAMS {
                d.remove(0);
            }
        }
        Ok(frames)
    }

    /// `count` consecutive frames of video camera `key` from episode time `t` on (one `ffmpeg`
    /// run).
    #[cfg(not(feature = "libav"))]
    fn decode_video(&self, ep: &Episode, key: &str, t: f64, count: usize) -> Result<Vec<RgbImage>> {
        let src = self.video_source(ep, key, t, count)?;
        video::decode_frames(&src.path, &self.frame_run(&src, count, ep))
    }

    /// `count` frames of `ep` from `src` on.
    fn frame_run(&self, src: &VideoSource, count: usize, ep: &Episode) -> video::FrameRun {
        video::FrameRun {
            time_s: src.time_s,
            fps: f64::from(self.info.fps),
            count,
            width: src.width,
            height: src.height,
            episode: ep.episode_index,
        }
    }

    /// Where `count` consecutive frames of camera `key` from episode time `t` are, after
    /// LeRobot's timestamp check: each query `from_timestamp + t + i / fps` must have a frame
    /// within [`TOLERANCE_S`](crate::verify::TOLERANCE_S) (else LeRobot raises
    /// `FrameTimestampError`), and those frames must follow one another in the file, so that
    /// decoding `count` frames in a row from the first returns exactly the frames LeRobot's
    /// per-timestamp lookup returns.
    fn video_source(&self, ep: &Episode, key: &str, t: f64, count: usize) -> Result<VideoSource> {
        let f = self
            .info
            .features
            .get(key)
            .ok_or_else(|| DatasetError::Usage(format!("no feature {key:?}")))?;
        let (height, width) = f.hw().ok_or_else(|| {
            inconsistent(
                self.root.join("meta/info.json"),
                format!("camera {key:?} shape is not [H, W, C]"),
            )
        })?;
        let span = ep.videos.get(key).ok_or_else(|| DatasetError::Episode {
            path: self.root.join("meta/episodes"),
            episode: ep.episode_index,
            message: format!("no video location for camera {key:?}"),
        })?;
        let path = self.root.join(&span.path);
        let time_s = span.from_timestamp + t;
        let video_err = |message: String| DatasetError::Video {
            path: path.clone(),
            episode: ep.episode_index,
            timestamp: time_s,
            message,
        };
        if !path.exists() {
            return Err(video_err("video file is missing".into()));
        }
        let times = self.frame_times(&path).map_err(|e| match e {
            DatasetError::Video { message, .. } => video_err(message),
            e => e,
        })?;
        let fps = f64::from(self.info.fps);
        let mut first = None;
        for i in 0..count {
            let query = time_s + i as f64 / fps;
            let found = video::nearest(&times, query);
            let ok = match (found, first) {
                (Some((j, d)), Some(j0)) => d <= crate::verify::TOLERANCE_S && j == j0 + i,
                (Some((j, d)), None) => {
                    first = Some(j);
                    d <= crate::verify::TOLERANCE_S
                }
                (None, _) => false,
            };
            if !ok {
                return Err(DatasetError::Video {
                    path,
                    episode: ep.episode_index,
                    timestamp: query,
                    message: format!(
                        "{key}: no frame within {}s of {query:.6}s (nearest: {}); the metadata's from_timestamp drifts from the video (LeRobot raises FrameTimestampError here; `zk0-agent dataset verify` lists every such episode)",
                        crate::verify::TOLERANCE_S,
                        found.map_or("none".into(), |(j, _)| format!("{:.6}s", times[j]))
                    ),
                });
            }
        }
        Ok(VideoSource {
            path,
            time_s,
            width,
            height,
        })
    }

    /// The presentation times of a video file's frames, probed once per file.
    fn frame_times(&self, path: &Path) -> Result<Arc<Vec<f64>>> {
        if let Some(t) = self
            .frame_times
            .lock()
            .ok()
            .and_then(|m| m.get(path).cloned())
        {
            return Ok(t);
        }
        let t = Arc::new(video::frame_times(path, None)?);
        if let Ok(mut m) = self.frame_times.lock() {
            m.insert(path.to_path_buf(), t.clone());
        }
        Ok(t)
    }

    /// Every frame of one camera over a whole episode, in one decoder pass (sequential access).
    pub fn decode_episode(&self, episode: usize, key: &str) -> Result<Vec<RgbImage>> {
        let ep = self.episode(episode)?.clone();
        let f = self
            .info
            .features
            .get(key)
            .ok_or_else(|| DatasetError::Usage(format!("no feature {key:?}")))?;
        if f.is_image() {
            return (ep.dataset_from_index..ep.dataset_to_index)
                .map(|i| self.decode_camera(&ep, key, i, None))
                .collect();
        }
        let t0 = f64::from(self.get_values(ep.dataset_from_index)?.timestamp);
        self.decode_video(&ep, key, t0, ep.length)
    }

    /// LeRobot's delta-timestamp query: for each `feature → offsets (s)`, the values at
    /// `index + round(offset·fps)` clamped into the episode, with `is_pad` where clamping happened.
    pub fn get_deltas(
        &self,
        index: usize,
        deltas: &BTreeMap<String, Vec<f64>>,
    ) -> Result<DeltaSample> {
        let ep = self.episode_of(index)?.clone();
        let fps = f64::from(self.info.fps);
        let mut values = BTreeMap::new();
        let mut images = BTreeMap::new();
        let mut is_pad = BTreeMap::new();
        for (key, offsets) in deltas {
            let feature = self.info.features.get(key).ok_or_else(|| {
                DatasetError::Usage(format!("delta_timestamps: no feature {key:?}"))
            })?;
            let (lo, hi) = (ep.dataset_from_index as i64, ep.dataset_to_index as i64);
            let mut query = Vec::with_capacity(offsets.len());
            let mut pad = Vec::with_capacity(offsets.len());
            for &d in offsets {
                let q = index as i64 + (d * fps).round() as i64;
                pad.push(q < lo || q >= hi);
                query.push(q.clamp(lo, hi - 1) as usize);
            }
            if feature.is_camera() {
                images.insert(key.clone(), self.camera_frames(&ep, key, &query)?);
            } else {
                let mut v = Vec::with_capacity(query.len());
                for &q in &query {
                    let mut fr = self.get_values(q)?;
                    v.push(fr.features.remove(key).ok_or_else(|| {
                        DatasetError::Usage(format!("feature {key:?} not in data"))
                    })?);
                }
                values.insert(key.clone(), v);
            }
            is_pad.insert(format!("{key}_is_pad"), pad);
        }
        let mut frame = self.get_values(index)?;
        for key in self.camera_keys() {
            if !deltas.contains_key(&key) {
                let img = self.decode_camera(&ep, &key, index, Some(frame.timestamp))?;
                frame.images.insert(key, img);
            }
        }
        Ok(DeltaSample {
            frame,
            values,
            images,
            is_pad,
        })
    }

    /// Frames of one camera at the given global indices of one episode; a video camera is
    /// decoded once over the covered range instead of once per index.
    fn camera_frames(&self, ep: &Episode, key: &str, indices: &[usize]) -> Result<Vec<RgbImage>> {
        let f = self
            .info
            .features
            .get(key)
            .ok_or_else(|| DatasetError::Usage(format!("no feature {key:?}")))?;
        let cache_on = self.frames.lock().map(|c| c.max_bytes > 0).unwrap_or(false);
        if f.is_image() || indices.is_empty() || cache_on {
            return indices
                .iter()
                .map(|&i| self.decode_camera(ep, key, i, None))
                .collect();
        }
        let (lo, hi) = (
            *indices.iter().min().unwrap_or(&0),
            *indices.iter().max().unwrap_or(&0),
        );
        let t0 = f64::from(self.get_values(lo)?.timestamp);
        let run = self.decode_video(ep, key, t0, hi - lo + 1)?;
        Ok(indices.iter().map(|&i| run[i - lo].clone()).collect())
    }
}
