//! The policy closing the loop on the follower arm: LeRobot's asynchronous inference
//! (`RobotClient` + `PolicyServer`) in one process, the control loop on one thread and the
//! policy on another ([`worker`]), joined by [`zk0_infer::ActionQueue`].
//!
//! Per tick at `fps` ([`Clock`], absolute deadlines): read the follower's positions
//! (`observation.state`) and each camera's latest frame; take any chunk the worker finished
//! into the queue; if the queue asks for one, hand the worker this tick's observation
//! (`try_send`: the tick never waits for inference); pop this tick's action; clamp it to the
//! calibrated range and to `max_relative_target` of the present position; send it. A tick with
//! no action holds the last goal (nothing is sent) and counts as starved once the first chunk
//! has arrived. Errors end the loop with the summary of what ran; the caller disconnects.

pub mod follow;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use zk0_infer::{ActionQueue, QueueStats};
use zk0_robot::arm::clamp_relative;
use zk0_robot::camera::{Camera, CameraError, Frame};
use zk0_robot::control::{Clock, ClockStats, ControlError};
use zk0_robot::normalize::normalize;
use zk0_robot::{Arm, ArmError, BusStats, Transport};

use worker::{ObsRequest, Worker};

/// One error enum for the act layer; each names the tick and the part at fault.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("follower arm, tick {tick}: {source}")]
    Follower {
        tick: u64,
        #[source]
        source: ArmError,
    },
    #[error("tick {tick}: {source}")]
    Camera {
        tick: u64,
        #[source]
        source: CameraError,
    },
    #[error("policy, observation of tick {tick}: {source}")]
    Policy {
        tick: u64,
        #[source]
        source: zk0_infer::Error,
    },
    #[error("policy, observation of tick {tick}: action {step} has a non-finite value {value} for joint {joint}")]
    NonFinite {
        tick: u64,
        step: usize,
        joint: usize,
        value: f32,
    },
    #[error(
        "policy, observation of tick {tick}: action {step} has {got} values for {want} joints"
    )]
    Width {
        tick: u64,
        step: usize,
        got: usize,
        want: usize,
    },
    #[error("the inference worker stopped")]
    WorkerGone,
    #[error(transparent)]
    Clock(#[from] ControlError),
    /// Opening a part: the export, the arm, a camera.
    #[error("{part}: {reason}")]
    Setup { part: String, reason: String },
}

/// How the loop runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ActOptions {
    pub fps: f64,
    /// Stop after this long (`None`: until `stop`).
    pub seconds: Option<f64>,
    /// Largest move of a goal from the present position, per tick, in normalized units.
    pub max_relative_target: Option<f64>,
    /// A camera without a fresh frame for this long is an error (until then its stale ticks
    /// are counted and no observation is sent).
    pub camera_timeout: Duration,
}

impl Default for ActOptions {
    fn default() -> Self {
        Self {
            fps: 30.0,
            seconds: None,
            max_relative_target: None,
            camera_timeout: Duration::from_secs(2),
        }
    }
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    Signal,
    Time,
    Error,
}

/// Percentiles of durations without keeping every sample: 50 µs bins up to 2 s.
#[derive(Clone)]
pub struct Histogram {
    bins: Vec<u32>,
    n: u64,
    max_s: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            bins: vec![0; (Self::TOP_S / Self::BIN_S) as usize + 1],
            n: 0,
            max_s: 0.0,
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Histogram {}", self.json())
    }
}

impl Histogram {
    const BIN_S: f64 = 50e-6;
    const TOP_S: f64 = 2.0;

    pub fn add(&mut self, seconds: f64) {
        let i = ((seconds.max(0.0) / Self::BIN_S) as usize).min(self.bins.len() - 1);
        self.bins[i] += 1;
        self.n += 1;
        self.max_s = self.max_s.max(seconds);
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    /// The `p` quantile in milliseconds (bin centre; the last bin is the maximum).
    pub fn quantile_ms(&self, p: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let rank = ((self.n - 1) as f64 * p).round() as u64;
        let mut seen = 0u64;
        for (i, &c) in self.bins.iter().enumerate() {
            seen += u64::from(c);
            if seen > rank {
                if i == self.bins.len() - 1 {
                    break;
                }
                return ((i as f64 + 0.5) * Self::BIN_S * 1e3).min(self.max_s * 1e3);
            }
        }
        self.max_s * 1e3
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"p50": self.quantile_ms(0.5), "p99": self.quantile_ms(0.99),
                           "max": self.max_s * 1e3, "n": self.n})
    }
}

/// What the loop did; reported whether or not it ended in an error.
#[derive(Debug, Clone, Default)]
pub struct ActSummary {
    pub clock: ClockStats,
    pub periods: Histogram,
    /// |period − nominal|.
    pub jitter: Histogram,
    /// Per chunk, in the worker.
    pub inference: Histogram,
    /// Ticks from an observation to its chunk's arrival (largest).
    pub max_latency_ticks: u64,
    pub queue: QueueStats,
    /// Tick the first chunk arrived at.
    pub first_chunk_tick: Option<u64>,
    pub goals_sent: u64,
    /// Largest |goal sent − policy action| over joints and ticks (how much the clamps cut).
    pub max_clamp: f64,
    /// Ticks where a clamp changed a goal.
    pub clamped_ticks: u64,
    /// Mean over joints and ticks of |present − goal sent the tick before| (tracking error).
    pub tracking_error: Mean,
    /// Mean over joints and ticks of |goal − goal the tick before| (the motion asked).
    pub goal_step: Mean,
    /// Per joint, the smallest and largest goal sent.
    pub goal_range: Vec<(f64, f64)>,
    /// Ticks where a camera's newest frame was older than a period times three.
    pub camera_stale: u64,
    /// Observations the worker was busy for (should stay 0: one in flight).
    pub busy: u64,
    pub follower_bus: BusStats,
}

/// A running mean.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mean {
    sum: f64,
    n: u64,
}

impl Mean {
    pub fn add(&mut self, v: f64) {
        self.sum += v;
        self.n += 1;
    }

    pub fn get(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }
}

impl ActSummary {
    /// The report line: everything above, and how the run ended.
    pub fn report(&self, fps: f64, exit: ExitReason, error: Option<String>) -> serde_json::Value {
        let b = &self.follower_bus;
        let q = &self.queue;
        serde_json::json!({
            "exit_reason": exit,
            "error": error,
            "fps": fps,
            "ticks": self.clock.ticks,
            "overruns": self.clock.overruns,
            "period_ms": {"mean": self.clock.mean_period_s * 1e3, "p50": self.periods.quantile_ms(0.5),
                          "p99": self.periods.quantile_ms(0.99), "max": self.clock.max_period_s * 1e3},
            "jitter_ms": {"p99": self.jitter.quantile_ms(0.99), "max": self.clock.max_jitter_s * 1e3},
            "inference_ms": self.inference.json(),
            "max_latency_ticks": self.max_latency_ticks,
            "chunks": q.chunks,
            "first_chunk_tick": self.first_chunk_tick,
            "starved": q.starved,
            "waiting": q.waiting,
            "stale_dropped": q.stale_dropped,
            "blended": q.blended,
            "skipped": q.skipped,
            "actions_popped": q.popped,
            "goals_sent": self.goals_sent,
            "max_clamp": self.max_clamp,
            "clamped_ticks": self.clamped_ticks,
            "tracking_error_mean": self.tracking_error.get(),
            "goal_step_mean": self.goal_step.get(),
            "goal_span_mean": if self.goal_range.is_empty() { 0.0 } else {
                self.goal_range.iter().map(|(lo, hi)| hi - lo).sum::<f64>() / self.goal_range.len() as f64
            },
            "camera_stale": self.camera_stale,
            "busy": self.busy,
            "follower_bus": {"transactions": b.transactions, "retries": b.retries, "timeouts": b.timeouts,
                             "checksum_errors": b.checksum_errors, "corrupt": b.corrupt,
                             "status_errors": b.status_errors},
        })
    }
}

/// Per motor, the normalized goals the calibrated range allows (LeRobot clamps raw goals to
/// the range in the -100..100 modes; degrees are not clamped there, so they are here).
pub fn goal_bounds<T: Transport>(arm: &Arm<T>) -> Result<Vec<(f64, f64)>, ArmError> {
    let cal = arm.calibration().ok_or(ArmError::NotCalibrated)?;
    arm.motors()
        .iter()
        .map(|m| {
            let c = cal
                .get(m.name)
                .ok_or_else(|| ArmError::MissingCalibration(m.name.to_string()))?;
            let a = normalize(m.name, m.norm_mode, c, c.range_min)?;
            let b = normalize(m.name, m.norm_mode, c, c.range_max)?;
            Ok((a.min(b), a.max(b)))
        })
        .collect()
}

/// What one run drives: the follower, the cameras in the export's order, the inference
/// worker and the queue between them.
pub struct Parts<'a, T> {
    pub follower: &'a mut Arm<T>,
    pub cameras: &'a [Camera],
    pub worker: &'a Worker,
    pub queue: &'a mut ActionQueue,
}

/// Runs the loop until `stop`, `opts.seconds` or an error. The summary comes back in every
/// case, with the exit reason and the error if any.
pub fn act<T: Transport>(
    mut p: Parts<'_, T>,
    opts: &ActOptions,
    stop: &AtomicBool,
) -> (ActSummary, ExitReason, Result<(), ActError>) {
    let mut s = ActSummary::default();
    let mut clock = match Clock::new(opts.fps) {
        Ok(c) => c,
        Err(e) => return (s, ExitReason::Error, Err(e.into())),
    };
    let result = run_loop(&mut p, opts, stop, &mut clock, &mut s);
    s.clock = clock.stats();
    s.queue = p.queue.stats();
    s.follower_bus = p.follower.bus().stats().clone();
    match result {
        Ok(exit) => (s, exit, Ok(())),
        Err(e) => (s, ExitReason::Error, Err(e)),
    }
}

/// The loop itself, one tick per iteration: timing, observation, chunks in and out, the
/// goal. Each step is a function below; this one only orders them and decides when to stop.
fn run_loop<T: Transport>(
    p: &mut Parts<'_, T>,
    opts: &ActOptions,
    stop: &AtomicBool,
    clock: &mut Clock,
    s: &mut ActSummary,
) -> Result<ExitReason, ActError> {
    let Parts {
        follower,
        cameras,
        worker,
        queue,
    } = p;
    let bounds = goal_bounds(follower).map_err(|source| ActError::Follower { tick: 0, source })?;
    let joints = bounds.len();
    let nominal = clock.period().as_secs_f64();
    let fresh = clock.period() * 3;
    let start = Instant::now();
    let mut last_tick: Option<Instant> = None;
    let mut last_sent: Option<Vec<f64>> = None;
    let mut last_fresh = Instant::now();
    for tick in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return Ok(ExitReason::Signal);
        }
        if opts
            .seconds
            .is_some_and(|t| start.elapsed().as_secs_f64() >= t)
        {
            return Ok(ExitReason::Time);
        }
        let at = clock.tick();
        if let Some(prev) = last_tick {
            let p = (at - prev).as_secs_f64();
            s.periods.add(p);
            s.jitter.add((p - nominal).abs());
        }
        last_tick = Some(at);

        // Observation: positions, then the cameras' newest frames.
        let present = follower
            .read_positions()
            .map_err(|source| ActError::Follower { tick, source })?;
        if let Some(prev) = &last_sent {
            for (p, g) in present.iter().zip(prev) {
                s.tracking_error.add((p - g).abs());
            }
        }
        let frames = observe_cameras(
            cameras,
            fresh,
            opts.camera_timeout,
            &mut last_fresh,
            tick,
            s,
        )?;

        // Chunks the worker finished, then maybe a new request.
        take_chunks(worker, queue, tick, joints, s)?;
        if let Some(frames) = frames {
            request_chunk(worker, queue, tick, frames, &present, s)?;
        }

        // This tick's action, clamped, to the follower.
        let Some(action) = queue.pop(tick) else {
            continue;
        };
        let goal = clamp_goal(&action, &present, &bounds, opts.max_relative_target, s);
        let sent = follower
            .send_action(&goal)
            .map_err(|source| ActError::Follower { tick, source })?;
        s.goals_sent += 1;
        record_sent(&sent, last_sent.as_deref(), s);
        last_sent = Some(sent);
    }
    unreachable!("the tick counter does not run out")
}

/// The cameras' frames for this tick's observation, or `None` while one is stale (counted);
/// a camera stale for longer than `timeout` since the last fresh set is an error.
fn observe_cameras(
    cameras: &[Camera],
    fresh: Duration,
    timeout: Duration,
    last_fresh: &mut Instant,
    tick: u64,
    s: &mut ActSummary,
) -> Result<Option<Vec<Frame>>, ActError> {
    let frames = latest_frames(cameras, fresh, tick)?;
    match frames {
        Some(_) => *last_fresh = Instant::now(),
        None => {
            s.camera_stale += 1;
            if last_fresh.elapsed() > timeout {
                let source = cameras
                    .iter()
                    .find_map(|c| c.read_latest(fresh).err())
                    .unwrap_or(CameraError::Timeout {
                        camera: "?".into(),
                        waited_ms: timeout.as_millis(),
                    });
                return Err(ActError::Camera { tick, source });
            }
        }
    }
    Ok(frames)
}

/// Every chunk the worker has finished since the last tick, checked, into the queue (never
/// waits: an empty channel ends it).
fn take_chunks(
    worker: &Worker,
    queue: &mut ActionQueue,
    tick: u64,
    joints: usize,
    s: &mut ActSummary,
) -> Result<(), ActError> {
    loop {
        match worker.try_recv() {
            Ok(reply) => {
                let actions = reply.actions.map_err(|source| ActError::Policy {
                    tick: reply.tick,
                    source,
                })?;
                check_chunk(reply.tick, &actions, joints)?;
                s.inference.add(reply.latency.as_secs_f64());
                s.max_latency_ticks = s.max_latency_ticks.max(tick - reply.tick);
                s.first_chunk_tick.get_or_insert(tick);
                queue.on_chunk(reply.tick, actions, tick);
            }
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Disconnected) => return Err(ActError::WorkerGone),
        }
    }
}

/// If the queue asks for a chunk, hands the worker this tick's observation without waiting
/// (`try_send`; a busy worker is counted, not waited for).
fn request_chunk(
    worker: &Worker,
    queue: &mut ActionQueue,
    tick: u64,
    frames: Vec<Frame>,
    present: &[f64],
    s: &mut ActSummary,
) -> Result<(), ActError> {
    if !queue.should_request(tick) {
        return Ok(());
    }
    let obs = ObsRequest {
        tick,
        frames,
        state: present.iter().map(|&v| v as f32).collect(),
    };
    match worker.try_send(obs) {
        Ok(()) => queue.requested(tick),
        Err(TrySendError::Full(_)) => s.busy += 1,
        Err(TrySendError::Disconnected(_)) => return Err(ActError::WorkerGone),
    }
    Ok(())
}

/// The policy's action as a goal the arm may take: within the calibrated `bounds`, and within
/// `max_relative_target` of the `present` position; how much that cut is counted.
fn clamp_goal(
    action: &[f32],
    present: &[f64],
    bounds: &[(f64, f64)],
    max_relative_target: Option<f64>,
    s: &mut ActSummary,
) -> Vec<f64> {
    let mut goal: Vec<f64> = Vec::with_capacity(bounds.len());
    let mut clamped = false;
    for ((a, p), (lo, hi)) in action.iter().zip(present).zip(bounds) {
        let a = f64::from(*a);
        let mut g = a.clamp(*lo, *hi);
        if let Some(cap) = max_relative_target {
            g = clamp_relative(g, *p, cap);
        }
        let cut = (g - a).abs();
        clamped |= cut > 0.0;
        s.max_clamp = s.max_clamp.max(cut);
        goal.push(g);
    }
    s.clamped_ticks += u64::from(clamped);
    goal
}

/// The motion statistics of the goal the arm took: its step from the last one and the range
/// of goals per joint.
fn record_sent(sent: &[f64], last_sent: Option<&[f64]>, s: &mut ActSummary) {
    if let Some(prev) = last_sent {
        for (g, p) in sent.iter().zip(prev) {
            s.goal_step.add((g - p).abs());
        }
    }
    if s.goal_range.is_empty() {
        s.goal_range = sent.iter().map(|&g| (g, g)).collect();
    }
    for ((lo, hi), &g) in s.goal_range.iter_mut().zip(sent) {
        *lo = lo.min(g);
        *hi = hi.max(g);
    }
}

/// Every camera's newest frame if all are fresh, `None` if one is stale or has none yet;
/// a camera gone is an error.
fn latest_frames(
    cameras: &[Camera],
    fresh: Duration,
    tick: u64,
) -> Result<Option<Vec<Frame>>, ActError> {
    let mut out = Vec::with_capacity(cameras.len());
    for c in cameras {
        match c.read_latest(fresh) {
            Ok(f) => out.push(f),
            Err(CameraError::Stale { .. } | CameraError::Timeout { .. }) => return Ok(None),
            Err(source) => return Err(ActError::Camera { tick, source }),
        }
    }
    Ok(Some(out))
}

/// A chunk with the arm's width and only finite values.
fn check_chunk(tick: u64, actions: &[Vec<f32>], joints: usize) -> Result<(), ActError> {
    for (step, a) in actions.iter().enumerate() {
        if a.len() != joints {
            return Err(ActError::Width {
                tick,
                step,
                got: a.len(),
                want: joints,
            });
        }
        if let Some((joint, &value)) = a.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(ActError::NonFinite {
                tick,
                step,
                joint,
                value,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::worker::tests::Ramp;
    use super::*;
    use crate::record::config::{CameraConfig, RobotConfig};
    use zk0_infer::Aggregate;
    use zk0_robot::Role;

    fn robot(fail_after: Option<u64>) -> RobotConfig {
        RobotConfig {
            cameras: vec![CameraConfig {
                name: "front".into(),
                width: 64,
                height: 48,
                fps: 50.0,
                fail_after,
                ..CameraConfig::default()
            }],
            ..RobotConfig::default()
        }
        .simulated()
    }

    fn ramp(step: f32, delay_ms: u64, nan_from: Option<u64>) -> Ramp {
        Ramp {
            n: 8,
            step,
            delay: Duration::from_millis(delay_ms),
            nan_from,
        }
    }

    /// `source` driving the emulated follower at 50 fps (8 actions a chunk, g = 0.5: a
    /// request at 4 left, 80 ms of margin) for `seconds`.
    fn run(
        seconds: f64,
        max_relative_target: Option<f64>,
        source: Ramp,
        fail_after: Option<u64>,
    ) -> (ActSummary, ExitReason, Result<(), ActError>) {
        let opts = ActOptions {
            fps: 50.0,
            seconds: Some(seconds),
            max_relative_target,
            ..ActOptions::default()
        };
        let r = robot(fail_after);
        let mut arm = r.connect_arm(Role::Follower).unwrap();
        let cameras = r.start_cameras().unwrap();
        let n = source.n;
        let worker = Worker::spawn(Box::new(source)).unwrap();
        let mut queue = ActionQueue::new(n, 0.5, Aggregate::WeightedAverage).unwrap();
        let stop = AtomicBool::new(false);
        let parts = Parts {
            follower: &mut arm,
            cameras: &cameras,
            worker: &worker,
            queue: &mut queue,
        };
        act(parts, &opts, &stop)
    }

    #[test]
    fn the_queue_keeps_the_arm_fed_and_the_arm_follows() {
        // 30 ms of inference: well inside the margin.
        let (s, exit, r) = run(2.0, Some(5.0), ramp(0.2, 30, None), None);
        r.unwrap();
        assert_eq!(exit, ExitReason::Time);
        let ticks = s.clock.ticks;
        assert!(
            (90..=101).contains(&ticks),
            "{ticks} ticks in 2 s at 50 fps"
        );
        assert_eq!(s.queue.starved, 0, "{s:?}");
        assert_eq!(s.busy, 0);
        // A chunk every n·(1 − g) = 4 ticks, give or take the latency.
        let per = ticks as f64 / s.queue.chunks as f64;
        assert!((3.0..=6.0).contains(&per), "a chunk every {per} ticks");
        assert!(
            s.queue.blended > 0 && s.queue.stale_dropped > 0,
            "{:?}",
            s.queue
        );
        assert!(s.goals_sent + s.queue.waiting >= ticks - 1);
        // Ramps of 0.2 per action from the present position: the goals move, the arm
        // follows within a few steps, and neither clamp bites.
        assert!(s.goal_step.get() > 0.05, "{s:?}");
        assert!(s.tracking_error.get() < 2.0, "{s:?}");
        assert_eq!(s.max_clamp, 0.0);
        let report = s.report(50.0, exit, None);
        assert_eq!(report["starved"], 0);
        assert!(
            report["jitter_ms"]["p99"].as_f64().unwrap() < 20.0,
            "{report}"
        );
    }

    #[test]
    fn slow_inference_starves_and_clamps_are_measured() {
        // 120 ms of inference against 80 ms of margin; ramps of 10 per action, capped to 1.
        let (s, _, r) = run(1.0, Some(1.0), ramp(10.0, 120, None), None);
        r.unwrap();
        assert!(s.queue.starved > 0, "{:?}", s.queue);
        assert!(s.max_latency_ticks >= 5, "{s:?}");
        assert!(s.max_clamp > 5.0 && s.clamped_ticks > 0, "{s:?}");
    }

    #[test]
    fn a_non_finite_action_and_a_lost_camera_are_errors_not_panics() {
        let (s, exit, r) = run(3.0, None, ramp(0.1, 5, Some(10)), None);
        assert_eq!(exit, ExitReason::Error);
        let e = r.unwrap_err();
        assert!(matches!(e, ActError::NonFinite { .. }), "{e}");
        assert!(e.to_string().contains("non-finite"), "{e}");
        assert!(s.queue.chunks >= 1, "the chunks before it were used");
        let (_, exit, r) = run(3.0, None, ramp(0.1, 5, None), Some(20));
        assert_eq!(exit, ExitReason::Error);
        let e = r.unwrap_err();
        assert!(
            matches!(e, ActError::Camera { .. }) && e.to_string().contains("front"),
            "{e}"
        );
    }

    #[test]
    fn a_servo_that_stops_answering_ends_the_run_with_the_bus_counters() {
        use zk0_robot::sim::{self, Servos, SimTransport};
        use zk0_robot::{ArmConfig, ArmModel, ArmSpec, BusConfig};
        let t = SimTransport::new(Servos::new(1..=6));
        let servos = t.servos();
        let cfg = ArmConfig::new(ArmSpec::new(ArmModel::So101, Role::Follower));
        let mut arm = Arm::new(cfg, t, BusConfig::default());
        let cal = sim::calibration(arm.motors());
        zk0_robot::control::prepare(&mut arm, cal).unwrap();
        let cameras = robot(None).start_cameras().unwrap();
        let worker = Worker::spawn(Box::new(ramp(0.1, 5, None))).unwrap();
        let mut queue = ActionQueue::new(8, 0.5, Aggregate::default()).unwrap();
        let stop = AtomicBool::new(false);
        let opts = ActOptions {
            fps: 50.0,
            seconds: Some(5.0),
            ..ActOptions::default()
        };
        let unplug = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            servos.lock().unwrap().faults_mut(3).unwrap().silent = true;
        });
        let parts = Parts {
            follower: &mut arm,
            cameras: &cameras,
            worker: &worker,
            queue: &mut queue,
        };
        let (s, exit, r) = act(parts, &opts, &stop);
        unplug.join().unwrap();
        assert_eq!(exit, ExitReason::Error);
        let e = r.unwrap_err();
        assert!(matches!(e, ActError::Follower { .. }), "{e}");
        assert!(e.to_string().starts_with("follower arm, tick "), "{e}");
        assert!(s.follower_bus.timeouts > 0, "{:?}", s.follower_bus);
        assert!(s.clock.ticks > 5 && s.goals_sent > 0, "{s:?}");
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_ms(0.5), 0.0);
        for i in 0..100 {
            h.add(f64::from(i) * 1e-3);
        }
        assert!(
            (h.quantile_ms(0.5) - 50.0).abs() < 1.0,
            "{}",
            h.quantile_ms(0.5)
        );
        assert!((h.quantile_ms(0.99) - 98.0).abs() < 1.0);
        h.add(5.0);
        assert_eq!(h.quantile_ms(1.0), 5000.0);
    }
}
