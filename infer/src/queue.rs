//! The action queue of LeRobot's asynchronous inference (`RobotClient`), as a pure state
//! machine: no threads, no clocks, ticks are integers the caller counts.
//!
//! Every queued action is keyed by the absolute control tick it is for. A chunk computed from
//! the observation taken at tick `k0` holds the actions for ticks `k0, k0 + 1, …`. The control
//! loop asks [`ActionQueue::should_request`] at each tick: a new observation is wanted when at
//! most `chunk_size_threshold × n_action_steps` actions remain and no request is in flight
//! (so inference overlaps the execution of the queued actions and the tick never waits for
//! it). When the chunk comes back at tick `k1`, its actions for ticks before `k1` are stale
//! and dropped; those for ticks still queued are blended with the queued ones by the
//! [`Aggregate`] function; the rest are appended. [`ActionQueue::pop`] gives the action for
//! the tick, or `None` when there is none (the caller holds its last goal: a starved tick).

use std::collections::BTreeMap;

use crate::{Error, Result};

/// How an overlapping action of a new chunk is merged with the queued one (LeRobot's
/// `aggregate_fn_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// The new action replaces the queued one.
    LatestOnly,
    /// 0.3 · old + 0.7 · new (LeRobot's default).
    #[default]
    WeightedAverage,
    /// 0.5 · old + 0.5 · new.
    Average,
    /// 0.7 · old + 0.3 · new.
    Conservative,
}

impl Aggregate {
    pub const NAMES: [&'static str; 4] =
        ["latest_only", "weighted_average", "average", "conservative"];

    /// One joint's blended value.
    pub fn blend(self, old: f32, new: f32) -> f32 {
        match self {
            Self::LatestOnly => new,
            Self::WeightedAverage => 0.3 * old + 0.7 * new,
            Self::Average => 0.5 * old + 0.5 * new,
            Self::Conservative => 0.7 * old + 0.3 * new,
        }
    }
}

impl std::str::FromStr for Aggregate {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "latest_only" => Ok(Self::LatestOnly),
            "weighted_average" => Ok(Self::WeightedAverage),
            "average" => Ok(Self::Average),
            "conservative" => Ok(Self::Conservative),
            _ => Err(Error::Config(format!(
                "aggregate {s:?}: expected one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

/// What the queue saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct QueueStats {
    /// Chunks received.
    pub chunks: u64,
    /// Actions of received chunks that were for ticks already past.
    pub stale_dropped: u64,
    /// Actions of received chunks blended with a queued one.
    pub blended: u64,
    /// Queued actions whose tick passed without being popped (the caller skipped ticks).
    pub skipped: u64,
    /// Actions popped.
    pub popped: u64,
    /// Ticks with no action, after the first chunk arrived.
    pub starved: u64,
    /// Ticks with no action before the first chunk (start-up).
    pub waiting: u64,
}

/// The actions to come, keyed by tick.
#[derive(Debug, Clone)]
pub struct ActionQueue {
    n_action_steps: usize,
    threshold: f64,
    aggregate: Aggregate,
    actions: BTreeMap<u64, Vec<f32>>,
    in_flight: Option<u64>,
    stats: QueueStats,
}

impl ActionQueue {
    /// `n_action_steps`: the actions kept of each chunk (the threshold's unit);
    /// `chunk_size_threshold` in [0, 1].
    pub fn new(
        n_action_steps: usize,
        chunk_size_threshold: f64,
        aggregate: Aggregate,
    ) -> Result<Self> {
        if n_action_steps == 0 {
            return Err(Error::Config("n_action_steps must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&chunk_size_threshold) {
            return Err(Error::Config(format!(
                "chunk_size_threshold must be in [0, 1], got {chunk_size_threshold}"
            )));
        }
        Ok(Self {
            n_action_steps,
            threshold: chunk_size_threshold,
            aggregate,
            actions: BTreeMap::new(),
            in_flight: None,
            stats: QueueStats::default(),
        })
    }

    pub fn n_action_steps(&self) -> usize {
        self.n_action_steps
    }

    /// Queued actions for `tick` and later.
    pub fn remaining(&self, tick: u64) -> usize {
        self.actions.range(tick..).count()
    }

    /// The observation tick of the request in flight.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// Whether to send the observation of `tick`: nothing in flight, and at most
    /// `threshold × n_action_steps` actions left.
    pub fn should_request(&self, tick: u64) -> bool {
        self.in_flight.is_none()
            && self.remaining(tick) as f64 <= self.threshold * self.n_action_steps as f64
    }

    /// The observation of `obs_tick` was sent.
    pub fn requested(&mut self, obs_tick: u64) {
        self.in_flight = Some(obs_tick);
    }

    /// The request in flight will not be answered (it failed): another may be sent.
    pub fn cancel_request(&mut self) {
        self.in_flight = None;
    }

    /// A chunk for the observation of `obs_tick` (`actions[i]` is for tick `obs_tick + i`),
    /// arriving at `now_tick`: actions for past ticks are dropped, overlapping ones blended,
    /// the rest queued. Ends the request in flight.
    pub fn on_chunk(&mut self, obs_tick: u64, actions: Vec<Vec<f32>>, now_tick: u64) {
        self.in_flight = None;
        self.stats.chunks += 1;
        self.drop_before(now_tick);
        for (tick, new) in (obs_tick..).zip(actions) {
            if tick < now_tick {
                self.stats.stale_dropped += 1;
                continue;
            }
            match self.actions.get_mut(&tick) {
                Some(old) if old.len() == new.len() => {
                    for (o, n) in old.iter_mut().zip(&new) {
                        *o = self.aggregate.blend(*o, *n);
                    }
                    self.stats.blended += 1;
                }
                _ => {
                    self.actions.insert(tick, new);
                }
            }
        }
    }

    /// The action for `tick` (`None`: none queued; the caller holds its last goal). Actions
    /// for earlier ticks still queued are dropped.
    pub fn pop(&mut self, tick: u64) -> Option<Vec<f32>> {
        self.drop_before(tick);
        match self.actions.remove(&tick) {
            Some(a) => {
                self.stats.popped += 1;
                Some(a)
            }
            None if self.stats.chunks > 0 => {
                self.stats.starved += 1;
                None
            }
            None => {
                self.stats.waiting += 1;
                None
            }
        }
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    fn drop_before(&mut self, tick: u64) {
        let keep = self.actions.split_off(&tick);
        self.stats.skipped += self.actions.len() as u64;
        self.actions = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` one-joint actions with values `first, first + 1, …`.
    fn chunk(first: f32, n: usize) -> Vec<Vec<f32>> {
        (0..n).map(|i| vec![first + i as f32]).collect()
    }

    fn q(agg: Aggregate) -> ActionQueue {
        ActionQueue::new(8, 0.5, agg).unwrap()
    }

    #[test]
    fn empty_queue_requests_and_starves_only_after_the_first_chunk() {
        let mut q = q(Aggregate::default());
        assert!(q.should_request(0));
        q.requested(0);
        assert_eq!(q.in_flight(), Some(0));
        assert!(!q.should_request(0), "one request in flight at a time");
        assert_eq!(q.pop(0), None);
        assert_eq!(q.pop(1), None);
        assert_eq!(q.stats().waiting, 2);
        assert_eq!(q.stats().starved, 0);
        // Observation of tick 0 answered at tick 2: actions 0 and 1 are stale.
        q.on_chunk(0, chunk(10.0, 8), 2);
        assert_eq!(q.in_flight(), None);
        let s = q.stats();
        assert_eq!((s.chunks, s.stale_dropped), (1, 2));
        assert_eq!(q.remaining(2), 6);
        for t in 2..8 {
            assert_eq!(q.pop(t), Some(vec![10.0 + t as f32]));
        }
        assert_eq!(q.pop(8), None);
        assert_eq!(q.stats().starved, 1);
        assert_eq!(q.stats().popped, 6);
    }

    #[test]
    fn threshold_is_a_fraction_of_n_action_steps() {
        let mut q = q(Aggregate::LatestOnly);
        q.on_chunk(0, chunk(0.0, 8), 0);
        // 8 left at tick 0 … 4 left at tick 4: 4 <= 0.5 × 8.
        for t in 0..4 {
            assert!(!q.should_request(t), "tick {t}: {} left", q.remaining(t));
            q.pop(t);
        }
        assert!(q.should_request(4));
        // Threshold 0: only when empty; 1: as soon as fewer than a chunk remain.
        let mut z = ActionQueue::new(8, 0.0, Aggregate::LatestOnly).unwrap();
        z.on_chunk(0, chunk(0.0, 8), 0);
        assert!(!z.should_request(7));
        assert!(z.should_request(8));
        let mut one = ActionQueue::new(8, 1.0, Aggregate::LatestOnly).unwrap();
        assert!(one.should_request(0));
        one.on_chunk(0, chunk(0.0, 8), 0);
        assert!(one.should_request(0), "8 <= 1.0 × 8");
        for bad in [-0.1, 1.5, f64::NAN] {
            assert!(
                ActionQueue::new(8, bad, Aggregate::Average).is_err(),
                "{bad}"
            );
        }
        assert!(ActionQueue::new(0, 0.5, Aggregate::Average).is_err());
    }

    #[test]
    fn every_aggregate_blends_the_overlap_and_appends_the_rest() {
        for (agg, want) in [
            (Aggregate::LatestOnly, 100.0),
            (Aggregate::WeightedAverage, 0.3 * 4.0 + 0.7 * 100.0),
            (Aggregate::Average, 0.5 * 4.0 + 0.5 * 100.0),
            (Aggregate::Conservative, 0.7 * 4.0 + 0.3 * 100.0),
        ] {
            let mut q = q(agg);
            q.on_chunk(0, chunk(0.0, 8), 0);
            for t in 0..4 {
                q.pop(t);
            }
            // Observation of tick 3 arriving at tick 4: action 3 stale, 4..7 blended with the
            // queued 4..7, 8..10 new.
            q.on_chunk(3, chunk(99.0, 8), 4);
            let s = q.stats();
            assert_eq!((s.stale_dropped, s.blended, s.chunks), (1, 4, 2), "{agg:?}");
            assert_eq!(q.remaining(4), 7);
            let a = q.pop(4).unwrap()[0];
            assert!((a - want).abs() < 1e-4, "{agg:?}: {a} != {want}");
            q.pop(5);
            q.pop(6);
            q.pop(7);
            assert_eq!(q.pop(8), Some(vec![104.0]), "{agg:?}: beyond the overlap");
            assert_eq!(q.stats().starved, 0);
        }
    }

    #[test]
    fn names_parse_and_bad_ones_are_listed() {
        for n in Aggregate::NAMES {
            let a: Aggregate = n.parse().unwrap();
            assert_eq!(serde_json::to_value(a).unwrap(), *n);
        }
        let e = "mean".parse::<Aggregate>().unwrap_err().to_string();
        assert!(e.contains("weighted_average"), "{e}");
        assert_eq!(Aggregate::default(), Aggregate::WeightedAverage);
    }

    #[test]
    fn late_chunks_and_skipped_ticks_are_counted() {
        let mut q = q(Aggregate::Average);
        // A chunk entirely in the past: all dropped, nothing queued.
        q.on_chunk(0, chunk(0.0, 8), 20);
        assert_eq!(q.stats().stale_dropped, 8);
        assert_eq!(q.remaining(0), 0);
        assert!(q.should_request(20));
        // The caller skipping ticks 21..22: their actions are dropped by the next pop.
        q.on_chunk(21, chunk(0.0, 8), 21);
        assert_eq!(q.pop(23), Some(vec![2.0]));
        assert_eq!(q.stats().skipped, 2);
        // A cancelled request can be sent again.
        q.requested(23);
        assert!(!q.should_request(28));
        q.cancel_request();
        assert!(q.should_request(28));
        // A chunk of another width replaces rather than blends.
        q.on_chunk(24, vec![vec![1.0, 2.0]], 24);
        assert_eq!(q.pop(24), Some(vec![1.0, 2.0]));
    }
}
