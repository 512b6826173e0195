//! Recording LeRobot v3.0 episodes from a leader/follower pair and cameras: LeRobot's
//! `record_loop` on [`zk0_robot`] and [`lerobot_dataset::DatasetWriter`].
//!
//! Per tick at the dataset's fps ([`zk0_robot::control::Clock`]): the teleop step (follower
//! positions → `observation.state`, leader positions → `action`, goals to the follower), then
//! per camera the frame after the one it gave last (`observation.images.<camera>`,
//! [`zk0_robot::camera::Camera::next_frame`]: in order, so a camera at the loop's rate loses
//! no frame to a late tick), all added to the writer's episode buffer. An episode is `round(fps × episode_time_s)` frames,
//! saved when complete; a reset phase (teleop only, nothing recorded) follows each episode but
//! the last. A stop request (SIGINT/SIGTERM) or an error mid-episode discards that episode:
//! the writer's commit point (`meta/info.json`) still names only the episodes saved before,
//! so the dataset stays valid and LeRobot loads them.
//!
//! The writer encodes each camera's video when the episode is saved, not while recording.
//!
//! Map: [`config`] is the agent config's `[robot]` section and what it builds (arms on serial
//! ports or the in-process emulator, cameras); this file is the loop.

pub mod config;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use image::RgbImage;
use lerobot_dataset::{DatasetConfig, DatasetError, DatasetWriter, FeatureValue, FrameData};
use zk0_robot::camera::{Camera, CameraError, Frame};
use zk0_robot::control::{Clock, ClockStats, ControlError, Teleop};
use zk0_robot::feetech::Transport;

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
}

/// What the loop reports as it goes (the command prints it).
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

/// Records `opts.episodes` episodes into `writer`. Finished episodes are saved as they end;
/// on a stop request or an error the episode under way is discarded and nothing saved is
/// touched. The caller disconnects the arms.
pub fn record<L: Transport, F: Transport>(
    rig: &mut Rig<L, F>,
    writer: &mut DatasetWriter,
    opts: &RecordOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
) -> Result<RecordSummary, RecordError> {
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
    let mut summary = RecordSummary::default();
    let first = writer.info().total_episodes;
    let per_episode = opts.frames_per_episode();
    let mut last: Vec<Option<u64>> = vec![None; rig.cameras.len()];
    for n in 0..opts.episodes {
        let episode = first + n;
        // A clock per phase: the pause to save must not count as an overrun.
        let mut clock = new_clock(episode)?;
        let result = record_episode(
            rig,
            writer,
            opts,
            episode,
            per_episode,
            &mut clock,
            stop,
            &mut last,
            &mut summary,
            progress,
        );
        summary.clock = merge(summary.clock, clock.stats());
        match result {
            Ok(true) => {}
            Ok(false) => {
                writer.clear_episode();
                summary.interrupted = true;
                return Ok(summary);
            }
            Err(e) => {
                writer.clear_episode();
                return Err(e);
            }
        }
        progress(Progress::Saving {
            episode,
            frames: per_episode,
        });
        let t = Instant::now();
        writer.save_episode()?;
        summary.saved.push(per_episode);
        progress(Progress::Saved {
            episode,
            seconds: t.elapsed().as_secs_f64(),
        });
        if n + 1 == opts.episodes {
            break;
        }
        // Reset phase: the leader still drives the follower, nothing is recorded.
        let of = opts.reset_ticks();
        let mut clock = new_clock(episode)?;
        for tick in 0..of {
            if stop.load(Ordering::Relaxed) {
                summary.interrupted = true;
                return Ok(summary);
            }
            clock.tick();
            rig.teleop
                .step()
                .map_err(|source| RecordError::Control { episode, source })?;
            if tick % opts.fps as usize == 0 {
                progress(Progress::Resetting { episode, tick, of });
            }
        }
        // The cameras ran on through the save and the reset: the next episode starts at the
        // newest frame, not at a gap from the last one recorded.
        last.iter_mut().for_each(|l| *l = None);
    }
    Ok(summary)
}

/// One episode into the writer's buffer; `Ok(false)` when a stop request cut it short.
fn record_episode<L: Transport, F: Transport>(
    rig: &mut Rig<L, F>,
    writer: &mut DatasetWriter,
    opts: &RecordOptions,
    episode: usize,
    frames: usize,
    clock: &mut Clock,
    stop: &AtomicBool,
    last: &mut [Option<u64>],
    summary: &mut RecordSummary,
    progress: &mut dyn FnMut(Progress),
) -> Result<bool, RecordError> {
    let timeout = camera_timeout(opts.fps);
    for frame in 0..frames {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
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
        for (cam, last) in rig.cameras.iter().zip(last.iter_mut()) {
            let f = cam
                .next_frame(*last, timeout)
                .map_err(|source| RecordError::Camera { episode, source })?;
            let counts = summary.cameras.entry(cam.name().to_string()).or_default();
            counts.frames += 1;
            if let Some(l) = *last {
                counts.dropped += f.index - l - 1;
            }
            *last = Some(f.index);
            let img = to_image(&f).ok_or_else(|| RecordError::Camera {
                episode,
                source: CameraError::Config {
                    camera: cam.name().to_string(),
                    reason: format!(
                        "frame {} has {} bytes for {}x{}",
                        f.index,
                        f.rgb.len(),
                        f.width,
                        f.height
                    ),
                },
            })?;
            data.images
                .insert(format!("observation.images.{}", cam.name()), img);
        }
        writer.add_frame(data)?;
        if frame % opts.fps as usize == 0 || frame + 1 == frames {
            progress(Progress::Recording {
                episode,
                frame: frame + 1,
                of: frames,
            });
        }
    }
    Ok(true)
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

    #[test]
    fn records_on_the_emulator_and_a_stop_keeps_what_was_saved() {
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
        let mut rig = robot.connect().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut w = DatasetWriter::create(dir.path(), rig.dataset_config(20)).unwrap();
        let stop = AtomicBool::new(false);
        let mut seen = vec![];
        let s = record(&mut rig, &mut w, &opts(3), &stop, &mut |p| {
            if let Progress::Saved { episode: 0, .. } = p {
                stop.store(true, Ordering::Relaxed);
            }
            seen.push(p);
        })
        .unwrap();
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
            &stop,
            &mut |_| {},
        );
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
