//! Recording LeRobot v3.0 episodes from a leader/follower pair and cameras: LeRobot's
//! `record_loop` on [`zk0_robot`] and [`lerobot_dataset::DatasetWriter`].
//!
//! Per tick at the dataset's fps ([`zk0_robot::control::Clock`]): the teleop step (follower
//! positions → `observation.state`, leader positions → `action`, goals to the follower), then
//! per camera the frame after the one it gave last (`observation.images.<camera>`,
//! [`zk0_robot::camera::Camera::next_frame`]: in order, so a camera at the loop's rate loses
//! no frame to a late tick), all added to the writer's episode buffer. An episode is
//! `round(fps × episode_time_s)` frames, saved when complete; a reset phase (teleop only,
//! nothing recorded) follows each episode but the last. LeRobot's keys are [`Controls`]: end
//! the episode or the reset early, re-record the episode, end recording keeping the episode
//! under way. An episode is saved before its reset (LeRobot saves after it), so a crash in
//! the reset cannot lose it, and a re-record asked during the reset does not undo it.
//!
//! A stop request (SIGINT/SIGTERM) or an error mid-episode discards that episode: the
//! writer's commit point (`meta/info.json`) still names only the episodes saved before, so
//! the dataset stays valid and LeRobot loads them.
//!
//! Video is encoded while recording: one `ffmpeg` per camera per episode fed frame by frame
//! ([`lerobot_dataset::video::StreamEncoder`]), with the writer's settings; at the end of the
//! episode the finished mp4s go to the writer, which appends them to the dataset's video files
//! without re-encoding. Only the frames LeRobot's camera stats sample are kept in memory.
//!
//! Map: [`config`] is the agent config's `[robot]` section and what it builds (arms on serial
//! ports or the in-process emulator, cameras); this file is the loop.

pub mod config;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use image::RgbImage;
use lerobot_dataset::stats::{self, FeatureStats, Stats};
use lerobot_dataset::video::StreamEncoder;
use lerobot_dataset::{DatasetConfig, DatasetError, DatasetWriter, FeatureValue, FrameData};
use zk0_robot::camera::{Camera, CameraError, Frame};
use zk0_robot::control::{Clock, ClockStats, ControlError, Teleop};
use zk0_robot::feetech::{BusStats, Transport};

/// One error enum for the record layer: each names the part at fault.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("episode {episode}: {source}")]
    Control {
        episode: usize,
        #[source]
        source: ControlError,
    },
    #[error("episode {episode}: {source}")]
    Camera {
        episode: usize,
        #[source]
        source: CameraError,
    },
    #[error("dataset: {0}")]
    Dataset(#[from] DatasetError),
    /// Opening a part: a port, a calibration file, a camera.
    #[error("{part}: {reason}")]
    Setup { part: String, reason: String },
    #[error("{0}")]
    Usage(String),
}

/// What to record (LeRobot's `DatasetRecordConfig` fields that matter here).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordOptions {
    pub task: String,
    pub episodes: usize,
    pub episode_time_s: f64,
    pub reset_time_s: f64,
    pub fps: u32,
}

impl RecordOptions {
    pub fn validate(&self) -> Result<(), RecordError> {
        let bad = |m: String| Err(RecordError::Usage(m));
        if self.fps == 0 || self.fps > 1000 {
            return bad(format!("fps must be in 1..=1000, got {}", self.fps));
        }
        if self.episodes == 0 {
            return bad("--episodes must be at least 1".into());
        }
        if !(self.episode_time_s.is_finite() && self.episode_time_s > 0.0) {
            return bad(format!(
                "--episode-time-s must be positive, got {}",
                self.episode_time_s
            ));
        }
        if self.frames_per_episode() == 0 {
            return bad("episode shorter than one frame".into());
        }
        if !(self.reset_time_s.is_finite() && self.reset_time_s >= 0.0) {
            return bad(format!(
                "--reset-time-s must be 0 or more, got {}",
                self.reset_time_s
            ));
        }
        if self.task.trim().is_empty() {
            return bad("--task must not be empty".into());
        }
        Ok(())
    }

    /// Frames in one episode: `round(fps × episode_time_s)`.
    pub fn frames_per_episode(&self) -> usize {
        (f64::from(self.fps) * self.episode_time_s).round() as usize
    }

    fn reset_ticks(&self) -> usize {
        (f64::from(self.fps) * self.reset_time_s).round() as usize
    }
}

/// The arms and cameras of one robot.
#[derive(Debug)]
pub struct Rig<L, F> {
    pub teleop: Teleop<L, F>,
    pub cameras: Vec<Camera>,
}

impl<L: Transport, F: Transport> Rig<L, F> {
    /// The dataset's features: LeRobot's for an SO follower, one video per camera.
    pub fn dataset_config(&self, fps: u32) -> DatasetConfig {
        let cams: Vec<(&str, u32, u32)> = self
            .cameras
            .iter()
            .map(|c| (c.name(), c.size().0, c.size().1))
            .collect();
        let mut cfg = DatasetConfig::so100(&cams);
        cfg.fps = fps;
        // LeRobot 0.6.1 writes the robot's `name` (`so_follower` for both models).
        cfg.robot_type = Some("so_follower".into());
        cfg
    }
}

/// Per-camera frame accounting over the recorded episodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CameraCounts {
    pub frames: u64,
    /// Camera frames skipped between two recorded frames (the loop fell behind the camera).
    pub dropped: u64,
}

/// How a recording run ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordSummary {
    /// Frames of each saved episode.
    pub saved: Vec<usize>,
    /// A stop request ended the run (the episode under way, if any, was discarded).
    pub interrupted: bool,
    pub clock: ClockStats,
    pub cameras: BTreeMap<String, CameraCounts>,
    /// Bus counters at the end of the run (retries, timeouts, …).
    pub leader_bus: BusStats,
    pub follower_bus: BusStats,
}

/// What the loop reports as it goes, every tick (the command prints some).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    Recording {
        episode: usize,
        frame: usize,
        of: usize,
    },
    Saving {
        episode: usize,
        frames: usize,
    },
    /// Dropped (re-record, or ended before its first frame).
    Discarded {
        episode: usize,
        frames: usize,
    },
    Saved {
        episode: usize,
        seconds: f64,
    },
    Resetting {
        episode: usize,
        tick: usize,
        of: usize,
    },
}

/// Adds one episode's clock statistics to the run's.
fn merge(run: ClockStats, ep: ClockStats) -> ClockStats {
    if run.ticks == 0 {
        return ep;
    }
    // Periods are measured between ticks: one fewer than the ticks in each episode.
    let (a, b) = (
        run.ticks.saturating_sub(1) as f64,
        ep.ticks.saturating_sub(1) as f64,
    );
    ClockStats {
        ticks: run.ticks + ep.ticks,
        overruns: run.overruns + ep.overruns,
        mean_period_s: (run.mean_period_s * a + ep.mean_period_s * b) / (a + b).max(1.0),
        min_period_s: run.min_period_s.min(ep.min_period_s),
        max_period_s: run.max_period_s.max(ep.max_period_s),
        max_jitter_s: run.max_jitter_s.max(ep.max_jitter_s),
    }
}

/// Waits this long for a camera frame newer than the last: LeRobot's `read_latest` refuses
/// frames older than 500 ms.
fn camera_timeout(fps: u32) -> Duration {
    Duration::from_millis(500).max(Duration::from_secs_f64(3.0 / f64::from(fps)))
}

fn to_image(f: &Frame) -> Option<RgbImage> {
    RgbImage::from_raw(f.width, f.height, f.rgb.as_ref().clone())
}

/// One episode's videos, encoded as its frames arrive: an encoder per camera, and the frames
/// LeRobot's camera stats sample (`0, step, 2·step, …`). Dropped unfinished (a stop, an
/// error), the encoders are killed and their files removed.
struct EpisodeVideos {
    /// `(feature key, mp4, encoder, sampled frames)` per camera.
    cameras: Vec<(String, PathBuf, StreamEncoder, Vec<RgbImage>)>,
    step: usize,
}

impl EpisodeVideos {
    fn start(
        writer: &DatasetWriter,
        cameras: &[Camera],
        episode: usize,
        frames: usize,
    ) -> Result<Self, RecordError> {
        let dir = writer.root().join(RECORDING_DIR);
        let mut out = Vec::with_capacity(cameras.len());
        for c in cameras {
            let key = format!("observation.images.{}", c.name());
            let path = dir.join(format!("{key}-{episode:06}.mp4"));
            let (w, h) = c.size();
            let enc = StreamEncoder::start(&path, w, h, writer.info().fps, writer.encoder())?;
            out.push((key, path, enc, Vec::new()));
        }
        Ok(Self {
            cameras: out,
            step: stats::sample_step(frames),
        })
    }

    /// Frame `n` of the episode from camera `i`.
    fn push(&mut self, i: usize, n: usize, f: &Frame) -> Result<(), RecordError> {
        let (_, _, enc, samples) = &mut self.cameras[i];
        if n.is_multiple_of(self.step) {
            if let Some(img) = to_image(f) {
                samples.push(img);
            }
        }
        enc.push(f.rgb.as_ref().clone())?;
        Ok(())
    }

    /// Waits for every mp4; returns them and the cameras' stats for the writer.
    fn finish(self) -> Result<(BTreeMap<String, PathBuf>, Stats), RecordError> {
        let mut videos = BTreeMap::new();
        let mut camera_stats = Stats::new();
        for (key, path, enc, samples) in self.cameras {
            enc.finish()?;
            let refs: Vec<&RgbImage> = samples.iter().collect();
            if let Some(st) = FeatureStats::compute_rgb(&refs) {
                camera_stats.insert(key.clone(), st);
            }
            videos.insert(key, path);
        }
        Ok((videos, camera_stats))
    }
}

/// LeRobot's recording events, raised from other threads (keys, signals) and read at each
/// tick.
#[derive(Debug, Default)]
pub struct Controls {
    /// SIGINT/SIGTERM: stop now, discarding the episode under way.
    pub stop: AtomicBool,
    /// Right arrow: end this episode (kept) or this reset now.
    pub exit_early: AtomicBool,
    /// Left arrow: drop this episode and record it again after the reset.
    pub rerecord: AtomicBool,
    /// Esc: end this episode (kept) and stop recording.
    pub stop_recording: AtomicBool,
}

impl Controls {
    fn take(flag: &AtomicBool) -> bool {
        flag.swap(false, Ordering::Relaxed)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn ending(&self) -> bool {
        self.stop_recording.load(Ordering::Relaxed)
    }
}

/// Records `opts.episodes` episodes into `writer`. Finished episodes are saved as they end;
/// on a stop request or an error the episode under way is discarded and nothing saved is
/// touched. The summary comes back in every case, with the error if one ended the run. The
/// caller disconnects the arms.
pub fn record<L: Transport, F: Transport>(
    rig: &mut Rig<L, F>,
    writer: &mut DatasetWriter,
    opts: &RecordOptions,
    controls: &Controls,
    progress: &mut dyn FnMut(Progress),
) -> (RecordSummary, Result<(), RecordError>) {
    let mut summary = RecordSummary::default();
    let result = record_episodes(rig, writer, opts, controls, progress, &mut summary);
    summary.leader_bus = rig.teleop.leader.bus().stats().clone();
    summary.follower_bus = rig.teleop.follower.bus().stats().clone();
    // Where episodes' videos are encoded; empty by now whatever happened (only if empty).
    let _ = std::fs::remove_dir(writer.root().join(RECORDING_DIR));
    (summary, result)
}

/// Under the dataset root: the videos of the episode being recorded.
pub const RECORDING_DIR: &str = ".recording";

/// LeRobot's `record()`: episode, reset, episode…; a re-recorded episode is dropped and
/// recorded again after its reset; Esc saves the episode under way and ends.
fn record_episodes<L: Transport, F: Transport>(
    rig: &mut Rig<L, F>,
    writer: &mut DatasetWriter,
    opts: &RecordOptions,
    controls: &Controls,
    progress: &mut dyn FnMut(Progress),
    summary: &mut RecordSummary,
) -> Result<(), RecordError> {
    opts.validate()?;
    if writer.info().fps != opts.fps {
        return Err(RecordError::Usage(format!(
            "the dataset is at {} fps, recording asks for {}",
            writer.info().fps,
            opts.fps
        )));
    }
    let new_clock = |episode| {
        Clock::new(f64::from(opts.fps)).map_err(|source| RecordError::Control { episode, source })
    };
    let first = writer.info().total_episodes;
    let per_episode = opts.frames_per_episode();
    let mut last: Vec<Option<u64>> = vec![None; rig.cameras.len()];
    while summary.saved.len() < opts.episodes && !controls.ending() {
        let episode = first + summary.saved.len();
        // A clock per phase: the pause to save must not count as an overrun.
        let mut clock = new_clock(episode)?;
        let result = record_episode(
            rig,
            writer,
            opts,
            episode,
            per_episode,
            &mut clock,
            controls,
            &mut last,
            summary,
            progress,
        );
        summary.clock = merge(summary.clock, clock.stats());
        let videos = match result {
            Ok(Some(v)) => v,
            Ok(None) => {
                writer.clear_episode();
                summary.interrupted = true;
                return Ok(());
            }
            Err(e) => {
                writer.clear_episode();
                return Err(e);
            }
        };
        let rerecord = Controls::take(&controls.rerecord);
        let frames = writer.pending_frames();
        if rerecord || frames == 0 {
            // Dropped: its encoders are killed and their files removed.
            drop(videos);
            writer.clear_episode();
            progress(Progress::Discarded { episode, frames });
        } else {
            progress(Progress::Saving { episode, frames });
            let t = Instant::now();
            let (videos, camera_stats) = videos.finish()?;
            let saved = writer.save_episode_with_videos(videos.clone(), camera_stats);
            // The writer copied them into the dataset.
            for v in videos.values() {
                let _ = std::fs::remove_file(v);
            }
            saved?;
            summary.saved.push(frames);
            progress(Progress::Saved {
                episode,
                seconds: t.elapsed().as_secs_f64(),
            });
        }
        if controls.ending() || (summary.saved.len() == opts.episodes && !rerecord) {
            break;
        }
        // Reset phase: the leader still drives the follower, nothing is recorded.
        let of = opts.reset_ticks();
        let mut clock = new_clock(episode)?;
        Controls::take(&controls.exit_early);
        for tick in 0..of {
            if controls.stopped() {
                summary.interrupted = true;
                return Ok(());
            }
            if Controls::take(&controls.exit_early) || controls.ending() {
                break;
            }
            clock.tick();
            rig.teleop
                .step()
                .map_err(|source| RecordError::Control { episode, source })?;
            progress(Progress::Resetting { episode, tick, of });
        }
        // The cameras ran on through the save and the reset: the next episode starts at the
        // newest frame, not at a gap from the last one recorded.
        last.iter_mut().for_each(|l| *l = None);
    }
    Ok(())
}

/// One episode into the writer's buffer and its videos into their encoders, until its
/// length or an early end (right arrow, left arrow, Esc); `Ok(None)` on a stop request.
fn record_episode<L: Transport, F: Transport>(
    rig: &mut Rig<L, F>,
    writer: &mut DatasetWriter,
    opts: &RecordOptions,
    episode: usize,
    frames: usize,
    clock: &mut Clock,
    controls: &Controls,
    last: &mut [Option<u64>],
    summary: &mut RecordSummary,
    progress: &mut dyn FnMut(Progress),
) -> Result<Option<EpisodeVideos>, RecordError> {
    let timeout = camera_timeout(opts.fps);
    // Keys pressed before this phase are not for it.
    Controls::take(&controls.exit_early);
    Controls::take(&controls.rerecord);
    // Stats sample by the planned length (LeRobot samples by the actual one: the same below
    // 100 frames, close above).
    let mut videos = EpisodeVideos::start(writer, &rig.cameras, episode, frames)?;
    for frame in 0..frames {
        if controls.stopped() {
            return Ok(None);
        }
        if Controls::take(&controls.exit_early)
            || controls.rerecord.load(Ordering::Relaxed)
            || controls.ending()
        {
            break;
        }
        clock.tick();
        let step = rig
            .teleop
            .step()
            .map_err(|source| RecordError::Control { episode, source })?;
        let mut data = FrameData {
            task: opts.task.clone(),
            ..FrameData::default()
        };
        data.values.insert(
            "observation.state".into(),
            FeatureValue::Float(step.observation),
        );
        data.values
            .insert("action".into(), FeatureValue::Float(step.action));
        for (i, (cam, last)) in rig.cameras.iter().zip(last.iter_mut()).enumerate() {
            let f = cam
                .next_frame(*last, timeout)
                .map_err(|source| RecordError::Camera { episode, source })?;
            let counts = summary.cameras.entry(cam.name().to_string()).or_default();
            counts.frames += 1;
            if let Some(l) = *last {
                counts.dropped += f.index - l - 1;
            }
            *last = Some(f.index);
            if f.rgb.len() != (f.width * f.height * 3) as usize || cam.size() != (f.width, f.height)
            {
                return Err(RecordError::Camera {
                    episode,
                    source: CameraError::Config {
                        camera: cam.name().to_string(),
                        reason: format!(
                            "frame {} is {}x{} with {} bytes, the camera is {:?}",
                            f.index,
                            f.width,
                            f.height,
                            f.rgb.len(),
                            cam.size()
                        ),
                    },
                });
            }
            videos.push(i, frame, &f)?;
        }
        writer.add_frame(data)?;
        progress(Progress::Recording {
            episode,
            frame: frame + 1,
            of: frames,
        });
    }
    Ok(Some(videos))
}

#[cfg(test)]
mod tests {
    use super::config::{CameraConfig, RobotConfig};
    use super::*;

    fn opts(episodes: usize) -> RecordOptions {
        RecordOptions {
            task: "pick".into(),
            episodes,
            episode_time_s: 0.3,
            reset_time_s: 0.1,
            fps: 20,
        }
    }

    fn sim_rig() -> Rig<config::AnyTransport, config::AnyTransport> {
        let robot = RobotConfig {
            cameras: vec![CameraConfig {
                name: "front".into(),
                width: 64,
                height: 64,
                fps: 20.0,
                ..CameraConfig::default()
            }],
            ..RobotConfig::default()
        }
        .simulated();
        robot.connect().unwrap()
    }

    #[test]
    fn keys_end_early_rerecord_and_stop_as_lerobots() {
        let mut rig = sim_rig();
        let dir = tempfile::tempdir().unwrap();
        let mut w = DatasetWriter::create(dir.path(), rig.dataset_config(20)).unwrap();
        let controls = Controls::default();
        let mut discarded = vec![];
        let o = RecordOptions {
            episode_time_s: 0.5,
            ..opts(3)
        };
        let (s, r) = record(&mut rig, &mut w, &o, &controls, &mut |p| match p {
            // Left arrow 3 frames into the first try, right arrow 4 into the second.
            Progress::Recording {
                episode: 0,
                frame: 3,
                ..
            } if discarded.is_empty() => controls.rerecord.store(true, Ordering::Relaxed),
            Progress::Recording {
                episode: 0,
                frame: 4,
                ..
            } => controls.exit_early.store(true, Ordering::Relaxed),
            // Esc 2 frames into the second episode: kept, and the end.
            Progress::Recording {
                episode: 1,
                frame: 2,
                ..
            } => controls.stop_recording.store(true, Ordering::Relaxed),
            Progress::Discarded { episode, frames } => discarded.push((episode, frames)),
            _ => {}
        });
        r.unwrap();
        assert_eq!(discarded, [(0, 3)]);
        assert_eq!(s.saved, [4, 2]);
        assert!(!s.interrupted);
        let ds = lerobot_dataset::LeRobotDataset::open(dir.path()).unwrap();
        assert_eq!(ds.episodes().len(), 2);
        assert_eq!(ds.len(), 6);
        for ep in 0..2 {
            let frames = ds.decode_episode(ep, "observation.images.front").unwrap();
            assert_eq!(frames.len(), [4, 2][ep]);
        }
        assert!(!dir.path().join(RECORDING_DIR).exists());
    }

    #[test]
    fn records_on_the_emulator_and_a_stop_keeps_what_was_saved() {
        let mut rig = sim_rig();
        let dir = tempfile::tempdir().unwrap();
        let mut w = DatasetWriter::create(dir.path(), rig.dataset_config(20)).unwrap();
        let controls = Controls::default();
        let stop = &controls.stop;
        let mut seen = vec![];
        let (s, r) = record(&mut rig, &mut w, &opts(3), &controls, &mut |p| {
            if let Progress::Saved { episode: 0, .. } = p {
                stop.store(true, Ordering::Relaxed);
            }
            seen.push(p);
        });
        r.unwrap();
        assert!(
            s.leader_bus.transactions > 6 && s.follower_bus.transactions > 6,
            "{s:?}"
        );
        assert_eq!(s.leader_bus.retries, 0);
        assert!(!dir.path().join(RECORDING_DIR).exists());
        assert_eq!(s.saved, [6]);
        assert!(s.interrupted);
        assert_eq!(s.clock.ticks, 6);
        assert_eq!(s.cameras["front"].frames, 6);
        assert!(seen.contains(&Progress::Saving {
            episode: 0,
            frames: 6
        }));
        assert_eq!(w.info().total_episodes, 1);
        assert_eq!(w.pending_frames(), 0);
        let ds = lerobot_dataset::LeRobotDataset::open(dir.path()).unwrap();
        assert_eq!(ds.len(), 6);
        assert_eq!(ds.info().robot_type.as_deref(), Some("so_follower"));

        // The wrong rate for this dataset, and bad options, are refused up front.
        let e = record(
            &mut rig,
            &mut w,
            &RecordOptions { fps: 30, ..opts(1) },
            &controls,
            &mut |_| {},
        )
        .1;
        assert!(matches!(e, Err(RecordError::Usage(_))));
        for bad in [
            RecordOptions {
                episodes: 0,
                ..opts(1)
            },
            RecordOptions {
                episode_time_s: 0.01,
                ..opts(1)
            },
            RecordOptions {
                reset_time_s: -1.0,
                ..opts(1)
            },
            RecordOptions {
                task: " ".into(),
                ..opts(1)
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
