//! The control loop's pieces: [`Clock`] (fixed-rate ticks with period, jitter and overrun
//! statistics), [`prepare`] (LeRobot's `connect()` of an arm), and [`Teleop`] (one
//! leader → follower step in LeRobot's record-loop order).

use std::time::{Duration, Instant};

use crate::arm::{Arm, ArmError};
use crate::calibration::Calibration;
use crate::feetech::Transport;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("follower arm: {0}")]
    Follower(#[source] ArmError),
    #[error("leader arm: {0}")]
    Leader(#[source] ArmError),
    #[error("control rate must be in (0, 1000] fps, got {0}")]
    Fps(f64),
}

/// How the ticks went: counts and measured periods in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClockStats {
    pub ticks: u64,
    /// Ticks that came late because the work of the one before outlasted the period.
    pub overruns: u64,
    pub mean_period_s: f64,
    pub min_period_s: f64,
    pub max_period_s: f64,
    /// Largest `|measured period - nominal period|`.
    pub max_jitter_s: f64,
}

/// Ticks at `fps` on deadlines `start + n × period`. A tick that comes late (an overrun)
/// fires at once and the schedule holds, so the average rate stays `fps` (a camera at the same
/// rate stays in step); only a stall of more than [`Clock::RESYNC_PERIODS`] periods restarts
/// the schedule from now instead of firing a burst of catch-up ticks.
#[derive(Debug, Clone)]
pub struct Clock {
    period: Duration,
    next: Option<Instant>,
    last: Option<Instant>,
    sum_period_s: f64,
    stats: ClockStats,
}

impl Clock {
    /// Lateness, in periods, past which the schedule restarts.
    pub const RESYNC_PERIODS: u32 = 5;

    pub fn new(fps: f64) -> Result<Self, ControlError> {
        if !(fps.is_finite() && fps > 0.0 && fps <= 1000.0) {
            return Err(ControlError::Fps(fps));
        }
        Ok(Self {
            period: Duration::from_secs_f64(1.0 / fps),
            next: None,
            last: None,
            sum_period_s: 0.0,
            stats: ClockStats::default(),
        })
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// Waits for the next tick (the first one is now) and returns its time.
    pub fn tick(&mut self) -> Instant {
        let now = Instant::now();
        let at = match self.next {
            None => now,
            Some(due) if now > due => {
                self.stats.overruns += 1;
                now
            }
            Some(due) => {
                std::thread::sleep(due - now);
                Instant::now()
            }
        };
        // Scheduled from the deadline (not the wake-up) so sleep overshoot does not add up.
        self.next = Some(match self.next {
            Some(due) if at <= due + self.period * Self::RESYNC_PERIODS => due + self.period,
            _ => at + self.period,
        });
        if let Some(last) = self.last {
            let p = (at - last).as_secs_f64();
            let s = &mut self.stats;
            self.sum_period_s += p;
            if s.ticks == 1 {
                s.min_period_s = p;
                s.max_period_s = p;
            }
            s.min_period_s = s.min_period_s.min(p);
            s.max_period_s = s.max_period_s.max(p);
            s.max_jitter_s = s.max_jitter_s.max((p - self.period.as_secs_f64()).abs());
            s.mean_period_s = self.sum_period_s / s.ticks as f64;
        }
        self.last = Some(at);
        self.stats.ticks += 1;
        at
    }

    pub fn stats(&self) -> ClockStats {
        self.stats
    }
}

/// LeRobot's `connect(calibrate=True)` without the questions: handshake, then, when the motors
/// do not hold `calibration`, write it to them (LeRobot asks and defaults to the file), then
/// `configure()`. Returns whether the calibration had to be written.
pub fn prepare<T: Transport>(arm: &mut Arm<T>, calibration: Calibration) -> Result<bool, ArmError> {
    arm.connect()?;
    arm.set_calibration(calibration.clone());
    let written = if arm.is_calibrated()? {
        false
    } else {
        // Offsets and limits only take with torque off (LeRobot does the same).
        arm.disable_torque()?;
        arm.write_calibration(&calibration)?;
        true
    };
    arm.configure()?;
    Ok(written)
}

/// One tick's values, normalized as LeRobot normalizes them, in motor order.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Follower positions read at the start of the tick (`observation.state`).
    pub observation: Vec<f64>,
    /// Leader positions (`action`, recorded before any clamp, as LeRobot does).
    pub action: Vec<f64>,
    /// The goals the follower was sent (after `max_relative_target`).
    pub sent: Vec<f64>,
}

/// A leader driving a follower.
#[derive(Debug)]
pub struct Teleop<L, F> {
    pub leader: Arm<L>,
    pub follower: Arm<F>,
}

impl<L: Transport, F: Transport> Teleop<L, F> {
    pub fn new(leader: Arm<L>, follower: Arm<F>) -> Self {
        Self { leader, follower }
    }

    /// Follower observation, leader action, follower goals: LeRobot's `record_loop` order
    /// (cameras, read by the caller, go with the observation).
    pub fn step(&mut self) -> Result<Step, ControlError> {
        let observation = self
            .follower
            .read_positions()
            .map_err(ControlError::Follower)?;
        let action = self.leader.read_positions().map_err(ControlError::Leader)?;
        let sent = self
            .follower
            .send_action(&action)
            .map_err(ControlError::Follower)?;
        Ok(Step {
            observation,
            action,
            sent,
        })
    }

    /// Drops torque on both arms (the follower as configured); the first error wins, but
    /// both are tried.
    pub fn disconnect(self) -> Result<(), ControlError> {
        let l = self.leader.disconnect().map_err(ControlError::Leader);
        let f = self.follower.disconnect().map_err(ControlError::Follower);
        l.and(f).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_ticks_at_the_rate_and_counts_overruns() {
        let mut c = Clock::new(100.0).unwrap();
        let t0 = c.tick();
        for _ in 0..20 {
            c.tick();
        }
        let el = t0.elapsed().as_secs_f64();
        assert!(
            (0.195..0.35).contains(&el),
            "20 ticks at 100 fps took {el}s"
        );
        let s = c.stats();
        assert_eq!(s.ticks, 21);
        assert!((s.mean_period_s - 0.01).abs() < 0.005, "{s:?}");
        assert!(s.min_period_s <= s.mean_period_s && s.mean_period_s <= s.max_period_s);
        let before = s.overruns;
        // Late by one and a half periods: the tick fires at once, and so does the next (the
        // schedule holds), then the rate is back.
        std::thread::sleep(Duration::from_millis(25));
        let t = Instant::now();
        c.tick();
        c.tick();
        assert!(t.elapsed() < Duration::from_millis(8), "{:?}", t.elapsed());
        assert!(c.stats().overruns > before, "{:?}", c.stats());
        // A stall of more than RESYNC_PERIODS restarts the schedule: the next tick is a
        // period later, not a burst.
        std::thread::sleep(Duration::from_millis(80));
        c.tick();
        let s = c.stats();
        assert!(s.max_period_s >= 0.08 && s.max_jitter_s >= 0.07, "{s:?}");
        let t = Instant::now();
        c.tick();
        assert!(t.elapsed() >= Duration::from_millis(8), "{:?}", t.elapsed());
    }

    #[test]
    fn bad_rates_are_refused() {
        for fps in [0.0, -1.0, f64::INFINITY, f64::NAN, 5000.0] {
            assert!(
                matches!(Clock::new(fps), Err(ControlError::Fps(_))),
                "{fps}"
            );
        }
    }
}
