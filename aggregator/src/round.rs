//! The round state machine, as a pure value: no I/O, no clock, no MQTT.
//!
//! The event loop feeds it the set of online clients, accepted updates and the current time;
//! it answers with transitions that the loop carries out (announce, aggregate, publish). The
//! whole struct is serialised to `state.json` after every transition, so a restarted aggregator
//! resumes the same round with the same accepted updates.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shared_proto::{ModelId, Sha256Hex};

use crate::aggregate::Excluded;

/// Scheduling knobs of the round machine (a subset of the aggregator config).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundConfig {
    /// Rounds to run; 0 runs forever.
    pub rounds: u64,
    /// Clients that must be online before a round is announced.
    pub min_clients: usize,
    /// Upper bound on selected clients; 0 means no bound.
    pub max_clients: usize,
    /// Fraction of the online clients selected each round (at least `min_clients`).
    pub fraction: f64,
    /// How long a round collects updates before it closes with whoever reported.
    pub round_timeout_ms: u64,
}

/// Where the current round stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Waiting until `min_clients` enrolled clients are online.
    Waiting,
    /// Announced; accepting updates until every selected client reported or the deadline.
    Collecting { started_ms: u64, deadline_ms: u64 },
    /// Closed; the accepted updates are being combined into the next global model.
    Aggregating { started_ms: u64, closed_ms: u64 },
    /// Every configured round has run.
    Finished,
}

/// One verified, accepted update of the current round (its blob lives in the state dir).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRecord {
    /// Aggregation weight: the client's example count.
    pub examples: u64,
    /// SHA-256 (hex) of the encoded update blob.
    pub sha256: Sha256Hex,
    /// Codec the client used (`f32`, `int8`, …).
    pub codec: String,
    /// Encoded size in bytes.
    pub bytes: u64,
    /// ‖Δ‖₂ of the decoded delta, measured on receipt (round close bounds it without
    /// decoding again). 0 in a state written before it was recorded.
    #[serde(default)]
    pub norm: f64,
    /// Training metrics the client reported.
    pub metrics: BTreeMap<String, f64>,
    /// The dataset the client trained on (the federation config's, else its status's), fixed
    /// when the update is accepted: a close redone after a restart names it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
}

/// Why a round closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Every selected client reported.
    AllReported,
    /// The deadline passed.
    Deadline,
}

/// Summary of a finished round, kept in the state for `status` and the metrics files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u64,
    pub base_model_id: ModelId,
    pub model_id: ModelId,
    pub close_reason: CloseReason,
    pub selected: Vec<String>,
    pub accepted: Vec<String>,
    pub dropped: Vec<String>,
    /// Accepted updates left out of the aggregate (norm outlier, non-finite aggregate).
    #[serde(default)]
    pub excluded: Vec<Excluded>,
    pub duration_ms: u64,
    /// Example-weighted mean of each client metric, over the aggregated updates.
    pub metrics: BTreeMap<String, f64>,
}

/// What the event loop must do after a call into the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// A round opened: publish the (retained) announcement.
    Announce,
    /// The selection grew during collection (a late joiner): re-publish the announcement.
    Reannounce,
    /// The round closed: aggregate the accepted updates.
    Close {
        reason: CloseReason,
        dropped: Vec<String>,
    },
    /// All rounds are done.
    Finish,
}

/// Why an update cannot be admitted to the current round (before any verification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The update is for an older round (a replay or a late straggler).
    StaleRound,
    /// The update is for a round that has not been announced.
    FutureRound,
    /// The round is not collecting (waiting, aggregating or finished).
    NotCollecting,
    /// This client already has an accepted update in this round.
    Duplicate,
}

/// The persisted round state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundState {
    /// Current round number, starting at 1.
    pub round: u64,
    /// Global model the current round trains from.
    pub model_id: ModelId,
    pub phase: Phase,
    pub selected: BTreeSet<String>,
    pub accepted: BTreeMap<String, UpdateRecord>,
    /// Finished rounds, oldest first.
    pub history: Vec<RoundSummary>,
    /// zk0 LR/mu scheduling state, persisted with the rounds so a resume announces the same.
    #[serde(default)]
    pub schedule: crate::schedule::ScheduleState,
}

impl RoundState {
    /// A fresh federation whose round 1 trains from `model_id`.
    pub fn new(model_id: impl Into<ModelId>) -> Self {
        RoundState {
            round: 1,
            model_id: model_id.into(),
            phase: Phase::Waiting,
            selected: BTreeSet::new(),
            accepted: BTreeMap::new(),
            history: Vec::new(),
            schedule: Default::default(),
        }
    }

    /// Deadline of the collecting round, if any.
    pub fn deadline_ms(&self) -> Option<u64> {
        match self.phase {
            Phase::Collecting { deadline_ms, .. } => Some(deadline_ms),
            _ => None,
        }
    }

    /// Advances on time and membership: opens a round once enough clients are online, closes
    /// it when all selected reported or the deadline passed. Call after every event.
    pub fn tick(
        &mut self,
        cfg: &RoundConfig,
        online: &BTreeSet<String>,
        now_ms: u64,
    ) -> Option<Transition> {
        match self.phase {
            Phase::Waiting => {
                if cfg.rounds > 0 && self.round > cfg.rounds {
                    self.phase = Phase::Finished;
                    return Some(Transition::Finish);
                }
                if online.len() < cfg.min_clients.max(1) {
                    return None;
                }
                self.selected = select(cfg, online, self.round);
                self.accepted.clear();
                self.phase = Phase::Collecting {
                    started_ms: now_ms,
                    deadline_ms: now_ms.saturating_add(cfg.round_timeout_ms),
                };
                Some(Transition::Announce)
            }
            Phase::Collecting {
                started_ms,
                deadline_ms,
            } => {
                let all_reported = !self.selected.is_empty()
                    && self.selected.iter().all(|c| self.accepted.contains_key(c));
                let reason = if all_reported {
                    CloseReason::AllReported
                } else if now_ms >= deadline_ms {
                    CloseReason::Deadline
                } else {
                    return None;
                };
                self.phase = Phase::Aggregating {
                    started_ms,
                    closed_ms: now_ms,
                };
                Some(Transition::Close {
                    reason,
                    dropped: self.dropped(),
                })
            }
            Phase::Aggregating { .. } | Phase::Finished => None,
        }
    }

    /// A client came online while a round collects: it joins the round if there is room
    /// (a late joiner takes the current round if open, else the next).
    pub fn join_late(&mut self, cfg: &RoundConfig, cid: &str) -> Option<Transition> {
        if !matches!(self.phase, Phase::Collecting { .. }) || self.selected.contains(cid) {
            return None;
        }
        if cfg.max_clients > 0 && self.selected.len() >= cfg.max_clients {
            return None;
        }
        self.selected.insert(cid.to_string());
        Some(Transition::Reannounce)
    }

    /// `cid` was revoked: the collecting round no longer waits for it (an update it already got
    /// in stays). Returns whether the round changed.
    pub fn withdraw(&mut self, cid: &str) -> bool {
        matches!(self.phase, Phase::Collecting { .. })
            && !self.accepted.contains_key(cid)
            && self.selected.remove(cid)
    }

    /// Whether an update from `cid` for `round` may be considered at all.
    pub fn admit(&self, cid: &str, round: u64) -> Result<(), Admission> {
        if round < self.round {
            return Err(Admission::StaleRound);
        }
        if round > self.round {
            return Err(Admission::FutureRound);
        }
        if !matches!(self.phase, Phase::Collecting { .. }) {
            return Err(Admission::NotCollecting);
        }
        if self.accepted.contains_key(cid) {
            return Err(Admission::Duplicate);
        }
        Ok(())
    }

    /// Records a verified update. The caller checked [`RoundState::admit`] first.
    pub fn record(&mut self, cid: &str, rec: UpdateRecord) {
        // An unselected client that got its update in counts as selected: dropouts only shrink
        // a round, contributions never get lost.
        self.selected.insert(cid.to_string());
        self.accepted.insert(cid.to_string(), rec);
    }

    /// Selected clients without an accepted update.
    pub fn dropped(&self) -> Vec<String> {
        self.selected
            .iter()
            .filter(|c| !self.accepted.contains_key(*c))
            .cloned()
            .collect()
    }

    /// The aggregated model is published: record the summary and move to the next round.
    /// `excluded`: accepted updates the aggregate left out.
    pub fn complete(
        &mut self,
        new_model_id: String,
        reason: CloseReason,
        excluded: Vec<Excluded>,
        now_ms: u64,
    ) -> RoundSummary {
        let aggregated: BTreeMap<String, UpdateRecord> = self
            .accepted
            .iter()
            .filter(|(c, _)| !excluded.iter().any(|e| &e.client_id == *c))
            .map(|(c, r)| (c.clone(), r.clone()))
            .collect();
        let started = match self.phase {
            Phase::Aggregating { started_ms, .. } | Phase::Collecting { started_ms, .. } => {
                started_ms
            }
            _ => now_ms,
        };
        let summary = RoundSummary {
            round: self.round,
            base_model_id: self.model_id.clone(),
            model_id: new_model_id.clone().into(),
            close_reason: reason,
            selected: self.selected.iter().cloned().collect(),
            accepted: self.accepted.keys().cloned().collect(),
            dropped: self.dropped(),
            excluded,
            duration_ms: now_ms.saturating_sub(started),
            metrics: weighted_metrics(&aggregated),
        };
        self.history.push(summary.clone());
        self.round += 1;
        self.model_id = new_model_id.into();
        self.phase = Phase::Waiting;
        self.selected.clear();
        self.accepted.clear();
        summary
    }
}

/// Picks this round's clients: `max(min_clients, ⌈fraction·n⌉)` capped by `max_clients`,
/// rotating through the sorted ids by round so every client gets its turn.
pub fn select(cfg: &RoundConfig, online: &BTreeSet<String>, round: u64) -> BTreeSet<String> {
    let n = online.len();
    if n == 0 {
        return BTreeSet::new();
    }
    let frac = if cfg.fraction.is_finite() {
        cfg.fraction.clamp(0.0, 1.0)
    } else {
        1.0
    };
    let mut k = ((frac * n as f64).ceil() as usize)
        .max(cfg.min_clients)
        .min(n);
    if cfg.max_clients > 0 {
        k = k.min(cfg.max_clients);
    }
    let ids: Vec<&String> = online.iter().collect();
    let offset = ((round.saturating_sub(1)) as usize).wrapping_mul(k) % n;
    (0..k).map(|j| ids[(offset + j) % n].clone()).collect()
}

/// Example-weighted mean of every metric the accepted clients reported.
pub fn weighted_metrics(accepted: &BTreeMap<String, UpdateRecord>) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for rec in accepted.values() {
        let w = rec.examples.max(1) as f64;
        for (k, v) in &rec.metrics {
            if v.is_finite() {
                let e = sums.entry(k.clone()).or_insert((0.0, 0.0));
                e.0 += w * v;
                e.1 += w;
            }
        }
    }
    sums.into_iter().map(|(k, (s, w))| (k, s / w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RoundConfig {
        RoundConfig {
            rounds: 2,
            min_clients: 2,
            max_clients: 0,
            fraction: 1.0,
            round_timeout_ms: 1000,
        }
    }
    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }
    fn rec(examples: u64, loss: f64) -> UpdateRecord {
        UpdateRecord {
            examples,
            sha256: Default::default(),
            codec: "f32".into(),
            bytes: 1,
            norm: 1.0,
            metrics: [("loss".to_string(), loss)].into(),
            dataset: None,
        }
    }

    #[test]
    fn waits_for_min_clients_then_announces() {
        let mut s = RoundState::new("m0");
        assert_eq!(s.tick(&cfg(), &set(&["a"]), 0), None);
        assert_eq!(
            s.tick(&cfg(), &set(&["a", "b"]), 10),
            Some(Transition::Announce)
        );
        assert_eq!(s.selected, set(&["a", "b"]));
        assert_eq!(s.deadline_ms(), Some(1010));
    }

    #[test]
    fn closes_when_all_selected_reported() {
        let mut s = RoundState::new("m0");
        s.tick(&cfg(), &set(&["a", "b"]), 0);
        s.record("a", rec(10, 1.0));
        assert_eq!(s.tick(&cfg(), &set(&["a", "b"]), 5), None);
        assert_eq!(s.admit("a", 1), Err(Admission::Duplicate));
        s.record("b", rec(30, 2.0));
        assert_eq!(
            s.tick(&cfg(), &set(&["a", "b"]), 6),
            Some(Transition::Close {
                reason: CloseReason::AllReported,
                dropped: vec![]
            })
        );
        assert_eq!(s.admit("b", 1), Err(Admission::NotCollecting));
        let sum = s.complete("m1".into(), CloseReason::AllReported, vec![], 20);
        assert_eq!(sum.metrics["loss"], 1.75);
        assert_eq!(s.round, 2);
        assert_eq!(s.admit("a", 1), Err(Admission::StaleRound));
        assert_eq!(s.admit("a", 3), Err(Admission::FutureRound));
    }

    #[test]
    fn deadline_closes_with_dropouts_named() {
        let mut s = RoundState::new("m0");
        s.tick(&cfg(), &set(&["a", "b", "c"]), 0);
        s.record("a", rec(1, 1.0));
        assert_eq!(s.tick(&cfg(), &set(&["a"]), 999), None);
        assert_eq!(
            s.tick(&cfg(), &set(&["a"]), 1000),
            Some(Transition::Close {
                reason: CloseReason::Deadline,
                dropped: vec!["b".into(), "c".into()]
            })
        );
    }

    #[test]
    fn a_revoked_client_is_no_longer_waited_for() {
        let mut s = RoundState::new("m0");
        let c = cfg();
        s.tick(&c, &set(&["a", "b", "c"]), 0);
        assert!(s.withdraw("c"));
        assert!(!s.withdraw("c"), "once");
        s.record("a", rec(10, 1.0));
        assert!(!s.withdraw("a"), "an accepted update stays");
        assert!(s.tick(&c, &set(&["a", "b"]), 1).is_none());
        s.record("b", rec(10, 1.0));
        assert!(matches!(
            s.tick(&c, &set(&["a", "b"]), 2),
            Some(Transition::Close { .. })
        ));
        assert!(!s.withdraw("b"), "not while aggregating");
    }

    #[test]
    fn late_joiner_enters_open_round_and_finish_after_last() {
        let mut c = cfg();
        c.rounds = 1;
        let mut s = RoundState::new("m0");
        s.tick(&c, &set(&["a", "b"]), 0);
        assert_eq!(s.join_late(&c, "d"), Some(Transition::Reannounce));
        assert_eq!(s.join_late(&c, "d"), None);
        s.tick(&c, &set(&["a"]), 2000);
        s.complete("m1".into(), CloseReason::Deadline, vec![], 2000);
        assert_eq!(
            s.tick(&c, &set(&["a", "b"]), 2001),
            Some(Transition::Finish)
        );
        assert_eq!(s.phase, Phase::Finished);
    }

    #[test]
    fn selection_respects_fraction_bounds_and_rotates() {
        let c = RoundConfig {
            rounds: 0,
            min_clients: 2,
            max_clients: 3,
            fraction: 0.5,
            round_timeout_ms: 1,
        };
        let online = set(&["a", "b", "c", "d", "e", "f", "g", "h"]);
        let r1 = select(&c, &online, 1);
        let r2 = select(&c, &online, 2);
        assert_eq!(r1.len(), 3);
        assert_ne!(r1, r2);
        let c2 = RoundConfig { fraction: 0.0, ..c };
        assert_eq!(select(&c2, &online, 1).len(), 2);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = RoundState::new("m0");
        s.tick(&cfg(), &set(&["a", "b"]), 0);
        s.record("a", rec(3, 0.5));
        let j = serde_json::to_string(&s).unwrap();
        let back: RoundState = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
    }
}
