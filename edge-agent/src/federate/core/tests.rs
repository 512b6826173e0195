//! The core driven event by event, no broker: each test states what the agent must do.

use std::collections::BTreeMap;
use std::path::Path;

use shared_proto::message::{
    ClientMetrics, HardwareInfo, HyperParams, ModelBlobKind, TensorInfo, PROTOCOL_VERSION,
};
use shared_proto::sign::KeyPair;
use shared_proto::tensor::{Tensor, TensorSet};

use super::*;
use crate::federate::worker::WorkerOutput;
use shared_proto::worker::WorkerMetrics;

const T0: u64 = 1_000_000;
const DEADLINE: u64 = T0 + 600_000;

struct Fixture {
    _dir: tempfile::TempDir,
    core: Core,
    /// The aggregator's key (pinned by the agent).
    key: KeyPair,
    /// The agent's own key.
    agent: KeyPair,
    /// The sequence number of the next announcement.
    seq: u64,
    /// The global model (canonical safetensors) and its id.
    blob: Vec<u8>,
    id: String,
}

fn fixture() -> Fixture {
    fixture_after(None)
}

/// A fixture whose agent ran before and left `previous` as its status file.
fn fixture_after(previous: Option<&AgentStatus>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig {
        client_id: "r1".into(),
        insecure: true,
        cache_dir: dir.path().join("cache"),
        work_dir: dir.path().join("work"),
        codec: "int8".into(),
        fetch_window: 2,
        ..AgentConfig::default()
    };
    let key = KeyPair::generate();
    let agent = KeyPair::generate();
    let hello = ClientStatus {
        v: PROTOCOL_VERSION,
        federation: "default".into(),
        session: 0,
        client_id: "r1".into(),
        online: true,
        dataset: "d".into(),
        examples: 0,
        hardware: HardwareInfo {
            cpu: "cpu".into(),
            cores: 1,
            mem_bytes: 1,
            gpu: None,
        },
        version: "0".into(),
        public_key: agent.public().to_compact(),
        signature: Vec::new(),
    };
    let core = Core::new(cfg, key.public(), agent.clone(), hello, previous).unwrap();
    let set: TensorSet = [(
        "w".to_string(),
        Tensor::new(vec![40], (0..40).map(|i| i as f32).collect()).unwrap(),
    )]
    .into_iter()
    .collect();
    let blob = shared_proto::tensor::write_safetensors(&set, &BTreeMap::new());
    let id = shared_proto::hash::sha256_hex(&blob);
    Fixture {
        _dir: dir,
        core,
        key,
        agent,
        seq: 100,
        blob,
        id,
    }
}

impl Fixture {
    fn cache_dir(&self) -> &Path {
        &self.core.cfg.cache_dir
    }

    fn manifest(&self, signer: &KeyPair) -> Bytes {
        let mut m = ModelManifest {
            v: PROTOCOL_VERSION,
            model_id: self.id.clone().into(),
            round: 1,
            tensors: vec![TensorInfo {
                name: "w".into(),
                shape: vec![40],
            }],
            total_len: self.blob.len() as u64,
            chunk_count: shared_proto::chunk::chunk_count(self.blob.len(), 64),
            chunk_size: 64,
            sha256: self.id.clone().into(),
            chunk_sha256: Vec::new(),
            kind: ModelBlobKind::Full,
            signature: Vec::new(),
        };
        m.describe_blob(&self.blob, 64);
        m.sign_with(signer);
        Bytes::from(message::encode(&m))
    }

    fn chunk(&self, i: u32) -> Bytes {
        let s = i as usize * 64;
        Bytes::copy_from_slice(&self.blob[s..(s + 64).min(self.blob.len())])
    }

    /// Puts the global model into the cache as a finished download does.
    fn seed_cache(&self) {
        let m: ModelManifest = message::decode(&self.manifest(&self.key), usize::MAX).unwrap();
        let mut f = ModelFetch::new(self.id.clone().into(), 100, 1 << 20);
        f.on_manifest(m, &self.key.public()).unwrap();
        for i in f.wanted() {
            f.insert(i, &self.chunk(i)).unwrap();
        }
        f.finish(self.cache_dir()).unwrap();
    }

    fn round(&mut self, round: u64, now: u64) -> Vec<Command> {
        self.round_with(round, now, |_| {})
    }

    /// Announces round `round` with the next sequence number, changed by `edit`, signed by
    /// the aggregator.
    fn round_with(
        &mut self,
        round: u64,
        now: u64,
        edit: impl FnOnce(&mut RoundAnnouncement),
    ) -> Vec<Command> {
        self.seq += 1;
        let mut ann = announcement(round, &self.id, self.seq);
        edit(&mut ann);
        ann.sign_with(&self.key);
        self.core
            .on(Event::Round(Bytes::from(message::encode(&ann))), now)
    }

    /// `ack` for the test update ([`encoded`]), sealed by `signer`.
    fn ack_by(&self, a: Ack, signer: &KeyPair) -> Event {
        let a = a.seal("default", &update_sha().into(), 1, signer);
        Event::Ack {
            round: a.round,
            payload: Bytes::from(message::encode(&a)),
        }
    }

    fn ack(&self, a: Ack) -> Event {
        self.ack_by(a, &self.key)
    }

    /// Cached model, round `round` announced, trained, encoded, manifest accepted, chunks
    /// uploaded: awaiting the verdict since `T0`.
    fn awaiting_ack(&mut self, round: u64) {
        self.seed_cache();
        self.round(round, T0);
        let cmds = self.core.on(trained(round), T0);
        assert!(cmds
            .iter()
            .any(|c| matches!(c, Command::SpawnEncode { .. })));
        let cmds = self.core.on(encoded(round), T0);
        assert_eq!(published(&cmds).len(), 1, "the manifest goes first");
        assert!(uploads(&cmds).is_empty(), "chunks only once asked for");
        let cmds = self
            .core
            .on(self.ack(Ack::incomplete("r1", round, (0..5).collect())), T0);
        let up = uploads(&cmds);
        assert_eq!(up.len(), 1);
        let upload_id = up[0].id;
        self.core.on(Event::Uploaded { round, upload_id }, T0);
        assert_eq!(self.core.phase().name(), "awaiting_ack");
    }
}

fn announcement(round: u64, model_id: &str, seq: u64) -> RoundAnnouncement {
    RoundAnnouncement {
        v: PROTOCOL_VERSION,
        federation: "default".into(),
        seq,
        round,
        model_id: model_id.into(),
        base_model: "base".into(),
        hyper: HyperParams {
            local_steps: 2,
            lr: 0.1,
            mu: 0.0,
            batch_size: 1,
            lr_overrides: BTreeMap::new(),
        },
        deadline_unix_ms: DEADLINE,
        min_clients: 1,
        selected: Vec::new(),
        accepted_codecs: vec!["f32".into(), "int8".into()],
        chunk_size: 64,
        max_update_bytes: 1 << 20,
        signature: Vec::new(),
    }
}

fn update_blob() -> Bytes {
    Bytes::from((0..300u32).map(|i| i as u8).collect::<Vec<_>>())
}

fn update_sha() -> String {
    shared_proto::hash::sha256_hex(&update_blob())
}

fn trained(round: u64) -> Event {
    Event::Trained {
        round,
        out: TrainOutput {
            out_path: "delta.safetensors".into(),
            output: WorkerOutput::Delta,
            global: "global.safetensors".into(),
            spec: Default::default(),
            metrics: WorkerMetrics {
                report: ClientMetrics {
                    loss: 0.5,
                    ..ClientMetrics::default()
                },
                ..WorkerMetrics::default()
            },
        },
    }
}

/// An encoded update of 5 chunks (64 B each but the last).
fn encoded(round: u64) -> Event {
    Event::Encoded {
        round,
        out: Outbound {
            round,
            deadline_ms: DEADLINE,
            blob: update_blob(),
            chunk_size: 64,
            manifest: Bytes::from_static(b"signed manifest"),
            sha256: update_sha().into(),
            sent_ms: 0,
            resends: 0,
            upload_id: 0,
        },
    }
}

fn uploads(cmds: &[Command]) -> Vec<&Upload> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::StartUpload(u) => Some(u),
            _ => None,
        })
        .collect()
}

fn subscribed(cmds: &[Command]) -> Vec<&str> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Subscribe(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

fn trainings(cmds: &[Command]) -> Vec<(u64, &TrainJob)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::SpawnTraining { round, job, .. } => Some((*round, job)),
            _ => None,
        })
        .collect()
}

fn published(cmds: &[Command]) -> Vec<(&str, &[u8])> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Publish { topic, payload, .. } => Some((topic.as_str(), &payload[..])),
            _ => None,
        })
        .collect()
}

#[test]
fn a_cached_model_is_trained_encoded_sent_and_acked() {
    let mut f = fixture();
    f.seed_cache();
    let cmds = f.round(1, T0);
    let t = trainings(&cmds);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].1.global, fetch::cache_path(f.cache_dir(), &f.id));
    assert_eq!(
        t[0].1.spec.tensors["w"],
        vec![40],
        "the manifest's tensors go to the job"
    );
    assert_eq!(t[0].1.steps, 2);
    assert_eq!(f.core.phase().name(), "training");

    let cmds = f.core.on(trained(1), T0 + 10);
    assert!(
        matches!(cmds.as_slice(), [Command::SaveStatus(st), Command::SpawnEncode { round: 1, .. }] if st.last_loss == Some(0.5))
    );
    let cmds = f.core.on(encoded(1), T0 + 20);
    assert_eq!(
        published(&cmds),
        [(
            f.core.topics().update_manifest("r1", 1).as_str(),
            &b"signed manifest"[..]
        )],
        "the signed manifest goes first"
    );
    assert_eq!(f.core.phase().name(), "awaiting_ack");
    // The aggregator accepts the manifest and asks for every chunk.
    let cmds = f
        .core
        .on(f.ack(Ack::incomplete("r1", 1, (0..5).collect())), T0 + 21);
    let up = uploads(&cmds);
    assert_eq!(up[0].chunks.len(), 5);
    assert_eq!(up[0].chunks[4].0, f.core.topics().update_chunk("r1", 1, 4));
    assert_eq!(f.core.phase().name(), "sending");
    assert_eq!(
        f.core.counters().resends,
        0,
        "the first request is no resend"
    );
    // A report from another (older) upload does not end this one.
    f.core.on(
        Event::Uploaded {
            round: 1,
            upload_id: up[0].id + 7,
        },
        T0 + 25,
    );
    assert_eq!(f.core.phase().name(), "sending");
    let id = up[0].id;
    f.core.on(
        Event::Uploaded {
            round: 1,
            upload_id: id,
        },
        T0 + 30,
    );
    assert_eq!(f.core.phase().name(), "awaiting_ack");

    let cmds = f.core.on(f.ack(Ack::accepted("r1", 1)), T0 + 40);
    assert!(cmds.iter().any(|c| matches!(c, Command::StopUpload)));
    assert!(cmds.iter().any(|c| matches!(c, Command::SaveStatus(st) if st.last_accepted == Some(true) && st.rounds_done == 1)));
    assert_eq!(f.core.phase().name(), "idle");
    assert!(f.core.is_done(1));
}

#[test]
fn an_uncached_model_is_fetched_in_windows_then_trained_on() {
    let mut f = fixture();
    let cmds = f.round(1, T0);
    assert_eq!(subscribed(&cmds), [f.core.topics().model_manifest(&f.id)]);
    assert_eq!(f.core.phase().name(), "fetching");
    let cmds = f.core.on(
        Event::ModelManifest {
            model_id: f.id.clone(),
            payload: f.manifest(&f.key),
        },
        T0,
    );
    let n = shared_proto::chunk::chunk_count(f.blob.len(), 64);
    assert!(n > 2, "the test model spans more than one window");
    assert_eq!(
        subscribed(&cmds),
        [
            f.core.topics().model_chunk(&f.id, 0),
            f.core.topics().model_chunk(&f.id, 1)
        ],
        "a window of fetch_window = 2 chunks"
    );
    let mut trained_on = None;
    for i in 0..n {
        let cmds = f.core.on(
            Event::ModelChunk {
                model_id: f.id.clone(),
                index: i,
                payload: f.chunk(i),
            },
            T0,
        );
        assert!(cmds.iter().any(
            |c| matches!(c, Command::Unsubscribe(t) if *t == f.core.topics().model_chunk(&f.id, i))
        ));
        if let Some((r, job)) = trainings(&cmds).first() {
            trained_on = Some((*r, job.global.clone()));
        }
    }
    let (r, path) = trained_on.expect("training starts once the model is complete");
    assert_eq!(r, 1);
    assert_eq!(std::fs::read(&path).unwrap(), f.blob);
    assert_eq!(
        fetch::cached(f.cache_dir(), &f.id).map(|c| c.path),
        Some(path)
    );
}

#[test]
fn a_wrongly_signed_manifest_or_a_foreign_chunk_is_never_trained_on() {
    let mut f = fixture();
    f.round(1, T0);
    let forged = f.manifest(&KeyPair::generate());
    let cmds = f.core.on(
        Event::ModelManifest {
            model_id: f.id.clone(),
            payload: forged,
        },
        T0,
    );
    assert!(
        subscribed(&cmds).is_empty(),
        "no chunk is requested for a forged manifest"
    );
    assert_eq!(f.core.counters().models_rejected, 1);
    assert_eq!(
        f.core.phase().name(),
        "fetching",
        "still waiting for the real manifest"
    );

    // The genuine manifest, then a chunk that is not ours (corrupted, or published by someone
    // else): dropped against its signed hash, still subscribed; the genuine one completes it.
    let cmds = f.core.on(
        Event::ModelManifest {
            model_id: f.id.clone(),
            payload: f.manifest(&f.key),
        },
        T0,
    );
    assert_eq!(subscribed(&cmds).len(), 2);
    let n = shared_proto::chunk::chunk_count(f.blob.len(), 64);
    let mut all = Vec::new();
    for i in 0..n {
        let mut c = f.chunk(i).to_vec();
        if i == 0 {
            c[10] ^= 0xff;
        }
        all.extend(f.core.on(
            Event::ModelChunk {
                model_id: f.id.clone(),
                index: i,
                payload: c.into(),
            },
            T0,
        ));
    }
    assert!(
        trainings(&all).is_empty(),
        "a model with a chunk not matching its hash is never trained on"
    );
    assert_eq!(f.core.counters().forged, 1);
    assert_eq!(f.core.phase().name(), "fetching");
    let cmds = f.core.on(
        Event::ModelChunk {
            model_id: f.id.clone(),
            index: 0,
            payload: f.chunk(0),
        },
        T0,
    );
    assert_eq!(trainings(&cmds).len(), 1, "the genuine chunk completes it");
    assert_eq!(f.core.counters().models_rejected, 1);
    assert!(fetch::cached(f.cache_dir(), &f.id).is_some());
}

#[test]
fn a_missing_ack_sends_the_manifest_again_after_the_wait() {
    let mut f = fixture();
    f.awaiting_ack(1);
    assert!(published(&f.core.on(Event::Tick, T0 + ACK_WAIT_MS - 1)).is_empty());
    let cmds = f.core.on(Event::Tick, T0 + ACK_WAIT_MS);
    assert_eq!(
        published(&cmds),
        [(
            f.core.topics().update_manifest("r1", 1).as_str(),
            &b"signed manifest"[..]
        )]
    );
    // The wait starts again from the resend.
    assert!(published(&f.core.on(Event::Tick, T0 + ACK_WAIT_MS + 1000)).is_empty());
    assert_eq!(
        published(&f.core.on(Event::Tick, T0 + 2 * ACK_WAIT_MS)).len(),
        1
    );
}

#[test]
fn an_incomplete_ack_resends_only_the_missing_chunks_a_bounded_number_of_times() {
    let mut f = fixture();
    f.awaiting_ack(1);
    let cmds = f
        .core
        .on(f.ack(Ack::incomplete("r1", 1, vec![1, 3])), T0 + 5);
    let up = uploads(&cmds);
    let idx: Vec<u32> = up[0].chunks.iter().map(|c| c.1).collect();
    assert_eq!(idx, [1, 3]);
    assert_eq!(up[0].chunk(3).unwrap().len(), 64);
    assert_eq!(f.core.phase().name(), "sending");
    assert_eq!(f.core.counters().resends, 1);
    for _ in 1..MAX_RESENDS {
        let cmds = f.core.on(f.ack(Ack::incomplete("r1", 1, vec![2])), T0 + 6);
        assert_eq!(uploads(&cmds).len(), 1);
    }
    let cmds = f.core.on(f.ack(Ack::incomplete("r1", 1, vec![2])), T0 + 7);
    assert!(
        uploads(&cmds).is_empty(),
        "no more than {MAX_RESENDS} resends"
    );
    assert_eq!(f.core.counters().resends, u64::from(MAX_RESENDS));
    // A verdict still settles it.
    let verdict = f.ack(Ack::rejected(
        "r1",
        1,
        shared_proto::message::RejectReason::HashMismatch,
        "x",
    ));
    f.core.on(verdict, T0 + 8);
    assert_eq!(f.core.phase().name(), "idle");
    assert_eq!(f.core.rounds_done(), 1);
}

#[test]
fn an_update_is_dropped_once_its_round_deadline_passes() {
    let mut f = fixture();
    f.awaiting_ack(1);
    assert!(
        !f.core.is_done(1),
        "an update awaiting its ack keeps the agent running"
    );
    let cmds = f.core.on(Event::Tick, DEADLINE);
    assert!(cmds.iter().any(|c| matches!(c, Command::StopUpload)));
    assert!(published(&cmds).is_empty());
    assert_eq!(f.core.phase().name(), "idle");
    assert!(f.core.is_done(1));
    // A late ack changes nothing.
    let late = f.ack(Ack::accepted("r1", 1));
    assert!(f.core.on(late, DEADLINE + 1).is_empty());
    // A round announced with its deadline already passed is not joined.
    let mut g = fixture();
    g.seed_cache();
    assert!(trainings(&g.round(1, DEADLINE)).is_empty());
}

#[test]
fn duplicate_and_old_round_announcements_are_ignored() {
    let mut f = fixture();
    f.seed_cache();
    assert_eq!(trainings(&f.round(2, T0)).len(), 1);
    assert!(
        trainings(&f.round(2, T0 + 1)).is_empty(),
        "the same round again while training"
    );
    // The replay of an earlier announcement (an older sequence number).
    let mut old = announcement(1, &f.id, 50);
    old.sign_with(&f.key);
    let cmds = f
        .core
        .on(Event::Round(message::encode(&old).into()), T0 + 2);
    assert!(cmds.is_empty(), "an older announcement changes nothing");
    assert_eq!(f.core.counters().stale_rounds, 1);
    assert_eq!(f.core.phase().name(), "training");
    // Finished rounds are not joined again when re-announced (e.g. retained, on reconnect).
    f.core.on(
        Event::WorkerFailed {
            round: 2,
            error: "x".into(),
            timed_out: false,
        },
        T0 + 3,
    );
    assert!(trainings(&f.round(2, T0 + 4)).is_empty());
    // A malformed announcement is counted.
    f.core
        .on(Event::Round(Bytes::from_static(b"\xff\x00")), T0 + 5);
    assert_eq!(f.core.counters().malformed, 1);
}

#[test]
fn a_worker_failure_returns_to_idle_and_is_reported() {
    let mut f = fixture();
    f.seed_cache();
    f.round(1, T0);
    let cmds = f.core.on(
        Event::WorkerFailed {
            round: 1,
            error: "worker exited with 2".into(),
            timed_out: false,
        },
        T0 + 1,
    );
    let st = cmds
        .iter()
        .find_map(|c| match c {
            Command::SaveStatus(st) => Some(st),
            _ => None,
        })
        .expect("the failure is written to the status file");
    assert_eq!(st.last_error.as_deref(), Some("worker exited with 2"));
    assert_eq!(st.counters.worker_failures, 1);
    assert_eq!(st.rounds_done, 1);
    assert_eq!(f.core.phase().name(), "idle");
    // The next round is joined as usual.
    assert_eq!(trainings(&f.round(2, T0 + 2)).len(), 1);
}

#[test]
fn a_new_round_while_training_drops_the_old_update_and_joins_the_new_round() {
    let mut f = fixture();
    f.seed_cache();
    f.round(1, T0);
    assert!(
        trainings(&f.round(2, T0 + 1)).is_empty(),
        "the running worker finishes first"
    );
    let cmds = f.core.on(trained(1), T0 + 2);
    assert!(
        !cmds
            .iter()
            .any(|c| matches!(c, Command::SpawnEncode { .. })),
        "round 1's update is stale"
    );
    let t = trainings(&cmds);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].0, 2);
    assert_eq!(f.core.rounds_done(), 1);
}

#[test]
fn a_new_round_supersedes_an_update_still_awaiting_its_ack() {
    let mut f = fixture();
    f.awaiting_ack(1);
    let cmds = f.round(2, T0 + 1);
    assert!(cmds.iter().any(|c| matches!(c, Command::StopUpload)));
    assert_eq!(trainings(&cmds).len(), 1);
    assert_eq!(f.core.rounds_done(), 1);
}

#[test]
fn a_reconnect_resubscribes_says_hello_and_resends_the_manifest() {
    let mut f = fixture();
    f.awaiting_ack(1);
    f.core.on(Event::Disconnected, T0 + 1);
    let cmds = f.core.on(Event::Connected { session: 77 }, T0 + 2);
    let topics = f.core.topics();
    assert_eq!(
        subscribed(&cmds),
        [
            topics.server_status(),
            topics.round(),
            topics.acks_for("r1")
        ]
    );
    let sent = published(&cmds);
    assert_eq!(sent[0].0, topics.client_status("r1"));
    let st: ClientStatus = message::decode(sent[0].1, usize::MAX).unwrap();
    assert!(st.online && st.session == 77);
    st.verify_with(&f.agent.public())
        .expect("the status is signed by the agent's key");
    assert_eq!(
        sent[1],
        (
            topics.update_manifest("r1", 1).as_str(),
            &b"signed manifest"[..]
        ),
        "the manifest again: the aggregator answers with what it lacks"
    );
    assert!(uploads(&cmds).is_empty());
    // The goodbye and each connection's will: offline, signed, for that session.
    let (_, bye) = f.core.goodbye();
    let bye: ClientStatus = message::decode(&bye, usize::MAX).unwrap();
    assert!(!bye.online && bye.session == 77);
    bye.verify_with(&f.agent.public()).unwrap();
    let (t, will) = (f.core.will_maker())(78);
    assert_eq!(t, topics.client_status("r1"));
    let will: ClientStatus = message::decode(&will, usize::MAX).unwrap();
    assert!(!will.online && will.session == 78);
    will.verify_with(&f.agent.public()).unwrap();
}

#[test]
fn forged_and_foreign_announcements_are_dropped_and_counted() {
    let mut f = fixture();
    f.seed_cache();
    let mallory = KeyPair::generate();
    // Signed by another key; unsigned; for another federation (signed by the real key).
    let mut forged = announcement(1, &f.id, 500);
    forged.hyper.lr = 10.0;
    let unsigned = forged.clone();
    forged.sign_with(&mallory);
    let mut foreign = announcement(1, &f.id, 500);
    foreign.federation = "other".into();
    foreign.sign_with(&f.key);
    for ann in [forged, unsigned, foreign] {
        let cmds = f.core.on(Event::Round(message::encode(&ann).into()), T0);
        assert!(trainings(&cmds).is_empty());
    }
    assert_eq!(f.core.counters().forged, 3);
    assert_eq!(f.core.phase().name(), "idle");
    // The real one is acted on, with its own settings.
    let t = f.round(1, T0 + 1);
    assert_eq!(trainings(&t)[0].1.lr, 0.1);
}

#[test]
fn a_restarted_agent_refuses_announcements_older_than_it_acted_on() {
    let mut f = fixture();
    f.seed_cache();
    f.round(5, T0);
    let seq = f.seq;
    // The status file the first run leaves carries the newest sequence number.
    let previous = AgentStatus {
        announcement_seq: seq,
        ..AgentStatus::default()
    };
    let mut g = fixture_after(Some(&previous));
    g.seed_cache();
    // A replay of round 4's announcement (older model, older sequence): a rollback, refused.
    let mut old = announcement(4, &g.id, seq - 1);
    old.sign_with(&g.key);
    let cmds = g
        .core
        .on(Event::Round(message::encode(&old).into()), T0 + 2);
    assert!(trainings(&cmds).is_empty());
    assert_eq!(g.core.counters().stale_rounds, 1);
    // The retained current announcement (same sequence number) is taken up again.
    let mut cur = announcement(5, &g.id, seq);
    cur.sign_with(&g.key);
    let cmds = g
        .core
        .on(Event::Round(message::encode(&cur).into()), T0 + 3);
    assert_eq!(trainings(&cmds).len(), 1);
    // A newer announcement of an earlier round: the aggregator started the federation again.
    let mut restart = announcement(1, &g.id, seq + 10);
    restart.sign_with(&g.key);
    g.core.on(
        Event::WorkerFailed {
            round: 5,
            error: "x".into(),
            timed_out: false,
        },
        T0 + 4,
    );
    let cmds = g
        .core
        .on(Event::Round(message::encode(&restart).into()), T0 + 5);
    assert_eq!(trainings(&cmds).len(), 1);
}

#[test]
fn forged_replayed_and_foreign_acks_leave_the_update_alone() {
    let mut f = fixture();
    f.awaiting_ack(1);
    let mallory = KeyPair::generate();
    // A forged "accepted" (another key) and a forged rejection.
    let forged = f.ack_by(Ack::accepted("r1", 1), &mallory);
    assert!(f.core.on(forged, T0 + 1).is_empty());
    // A genuine ack for another client's update, replayed onto our topic.
    let theirs = Ack::accepted("r2", 1).seal("default", &update_sha().into(), 3, &f.key);
    let replayed = Event::Ack {
        round: 1,
        payload: message::encode(&theirs).into(),
    };
    assert!(f.core.on(replayed, T0 + 2).is_empty());
    // A genuine ack of ours, but about another blob (an earlier upload of this round).
    let other = Ack::accepted("r1", 1).seal("default", &"ab".repeat(32).into(), 4, &f.key);
    let stale = Event::Ack {
        round: 1,
        payload: message::encode(&other).into(),
    };
    assert!(f.core.on(stale, T0 + 3).is_empty());
    assert_eq!(f.core.counters().forged, 2);
    assert_eq!(
        f.core.phase().name(),
        "awaiting_ack",
        "the update still waits"
    );
    let real = f.ack(Ack::accepted("r1", 1));
    f.core.on(real, T0 + 4);
    assert_eq!(f.core.phase().name(), "idle");
    assert_eq!(f.core.rounds_done(), 1);
}

#[test]
fn server_status_is_checked_against_the_pinned_key() {
    let mut f = fixture();
    let status = |online, session, key: &KeyPair| {
        let s = ServerStatus {
            v: PROTOCOL_VERSION,
            federation: "default".into(),
            session,
            online,
            round: 1,
            model_id: None,
            aggregator_key: String::new(),
            ts_ms: 0,
            signature: Vec::new(),
        }
        .signed(key);
        Event::ServerStatus(message::encode(&s).into())
    };
    f.core.on(status(true, 10, &f.key), T0);
    assert_eq!(f.core.status.server_online, Some(true));
    f.core.on(status(false, 10, &KeyPair::generate()), T0);
    assert_eq!(f.core.counters().forged, 1);
    assert_eq!(f.core.status.server_online, Some(true));
    // The will of session 10, then an online status of session 10 replayed: stale.
    f.core.on(status(false, 10, &f.key), T0);
    assert_eq!(f.core.status.server_online, Some(false));
    f.core.on(status(true, 10, &f.key), T0);
    assert_eq!(f.core.status.server_online, Some(false));
    assert_eq!(f.core.counters().stale_statuses, 1);
    assert_eq!(f.core.counters().stale_rounds, 0, "a status is not a round");
    f.core.on(status(true, 11, &f.key), T0);
    assert_eq!(f.core.status.server_online, Some(true));
}

#[test]
fn training_is_bounded_by_the_deadline_and_the_worker_timeout() {
    let mut f = fixture();
    f.seed_cache();
    let cmds = f.round(1, T0);
    let timeout = cmds.iter().find_map(|c| match c {
        Command::SpawnTraining { timeout_ms, .. } => Some(*timeout_ms),
        _ => None,
    });
    assert_eq!(timeout, Some(DEADLINE - T0));
    f.core.cfg.worker_timeout_secs = 30;
    f.core.on(
        Event::WorkerFailed {
            round: 1,
            error: "x".into(),
            timed_out: false,
        },
        T0 + 1,
    );
    let cmds = f.round(2, T0 + 2);
    let timeout = cmds.iter().find_map(|c| match c {
        Command::SpawnTraining { timeout_ms, .. } => Some(*timeout_ms),
        _ => None,
    });
    assert_eq!(timeout, Some(30_000));
    let cmds = f.core.on(
        Event::WorkerFailed {
            round: 2,
            error: "killed".into(),
            timed_out: true,
        },
        T0 + 30_002,
    );
    assert!(cmds
        .iter()
        .any(|c| matches!(c, Command::SaveStatus(st) if st.counters.worker_timeouts == 1)));
    assert_eq!(f.core.phase().name(), "idle");
    assert_eq!(
        trainings(&f.round(3, T0 + 30_003)).len(),
        1,
        "the next round proceeds"
    );
}

#[test]
fn unselected_clients_and_unaccepted_codecs_sit_the_round_out() {
    let mut f = fixture();
    f.seed_cache();
    let cmds = f.round_with(1, T0, |a| a.selected = vec!["someone-else".into()]);
    assert!(trainings(&cmds).is_empty());
    assert_eq!(
        f.core.rounds_done(),
        0,
        "not selected: may be selected on a re-announcement"
    );
    let cmds = f.round_with(2, T0, |a| a.accepted_codecs = vec!["bf16".into()]);
    assert!(trainings(&cmds).is_empty());
    assert_eq!(
        f.core.rounds_done(),
        1,
        "a codec mismatch forfeits the round"
    );
}

/// A fixture with `[infer] follow_global = true`.
fn following() -> Fixture {
    let mut f = fixture();
    f.core.cfg.infer.follow_global = true;
    f
}

/// The exports asked for: (model id, round, weights file).
fn exports(cmds: &[Command]) -> Vec<(&str, u64, &Path)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::SpawnExport {
                model_id,
                round,
                weights,
                ..
            } => Some((model_id.as_str(), *round, weights.as_path())),
            _ => None,
        })
        .collect()
}

fn exported(id: &str, ok: bool) -> Event {
    Event::Exported {
        model_id: id.into(),
        result: if ok {
            Ok(Current {
                model_id: id.into(),
                dir: "/e".into(),
                round: 1,
            })
        } else {
            Err("boom".into())
        },
    }
}

/// A signed aggregator status naming `model_id`.
fn server_status(f: &Fixture, session: u64, model_id: &str) -> Event {
    let s = ServerStatus {
        v: PROTOCOL_VERSION,
        federation: "default".into(),
        session,
        online: true,
        round: 3,
        model_id: Some(model_id.into()),
        aggregator_key: String::new(),
        ts_ms: 0,
        signature: Vec::new(),
    }
    .signed(&f.key);
    Event::ServerStatus(message::encode(&s).into())
}

#[test]
fn follow_global_exports_a_new_verified_model_once_after_the_update_is_encoded() {
    let mut f = following();
    f.seed_cache();
    let weights = fetch::cache_path(f.cache_dir(), &f.id);
    let cmds = f.round(1, T0);
    assert_eq!(trainings(&cmds).len(), 1);
    assert!(exports(&cmds).is_empty(), "not while training");
    assert!(
        exports(&f.core.on(trained(1), T0)).is_empty(),
        "nor encoding"
    );
    let cmds = f.core.on(encoded(1), T0);
    assert_eq!(exports(&cmds), [(f.id.as_str(), 1, weights.as_path())]);
    let model = cmds.iter().find_map(|c| match c {
        Command::SpawnExport { model, .. } => Some(model.clone()),
        _ => None,
    });
    assert_eq!(
        model,
        Some(PathBuf::from("base")),
        "no model_dir: the announced base"
    );
    assert_eq!(f.core.phase().name(), "awaiting_ack");
    // The round's ack: done with the rounds, but not while the export runs.
    f.core
        .on(f.ack(Ack::incomplete("r1", 1, (0..5).collect())), T0);
    f.core.on(
        Event::Uploaded {
            round: 1,
            upload_id: 1,
        },
        T0,
    );
    f.core.on(f.ack(Ack::accepted("r1", 1)), T0);
    assert_eq!(f.core.rounds_done(), 1);
    assert!(!f.core.is_done(1), "the export is still running");
    assert!(exports(&f.core.on(exported(&f.id, true), T0)).is_empty());
    assert!(f.core.is_done(1));
    // The same model again (next round, the aggregator's status): no second export.
    let cmds = f.round(2, T0);
    assert_eq!(trainings(&cmds).len(), 1);
    f.core.on(trained(2), T0);
    assert!(exports(&f.core.on(encoded(2), T0)).is_empty());
    assert!(exports(&f.core.on(server_status(&f, 1, &f.id), T0)).is_empty());
    assert_eq!(f.core.counters().export_failures, 0);
}

#[test]
fn without_follow_global_nothing_is_exported() {
    let mut f = fixture();
    f.seed_cache();
    let mut all = f.round(1, T0);
    all.extend(f.core.on(trained(1), T0));
    all.extend(f.core.on(encoded(1), T0));
    all.extend(f.core.on(server_status(&f, 1, &f.id), T0));
    assert!(exports(&all).is_empty());
    assert_eq!(f.core.phase().name(), "awaiting_ack");
}

#[test]
fn the_aggregators_final_model_is_fetched_when_idle_and_exported() {
    let mut f = following();
    // Rounds over: no announcement to take part in, the status names the final model.
    let cmds = f.core.on(server_status(&f, 1, &f.id), T0);
    assert_eq!(subscribed(&cmds), [f.core.topics().model_manifest(&f.id)]);
    assert_eq!(f.core.phase().name(), "fetching");
    f.core.on(
        Event::ModelManifest {
            model_id: f.id.clone(),
            payload: f.manifest(&f.key),
        },
        T0,
    );
    let mut all = Vec::new();
    for i in 0..shared_proto::chunk::chunk_count(f.blob.len(), 64) {
        all.extend(f.core.on(
            Event::ModelChunk {
                model_id: f.id.clone(),
                index: i,
                payload: f.chunk(i),
            },
            T0,
        ));
    }
    let weights = fetch::cache_path(f.cache_dir(), &f.id);
    assert_eq!(exports(&all), [(f.id.as_str(), 3, weights.as_path())]);
    assert!(trainings(&all).is_empty());
    assert_eq!(f.core.phase().name(), "idle");
    // A failed export is counted and not retried for the same model.
    f.core.on(exported(&f.id, false), T0);
    assert_eq!(f.core.counters().export_failures, 1);
    assert!(exports(&f.core.on(server_status(&f, 2, &f.id), T0)).is_empty());
}

#[test]
fn the_export_a_previous_run_made_is_not_made_again() {
    let mut f = following();
    f.core = std::mem::replace(&mut f.core, fixture().core).with_exported(Some(f.id.clone()));
    f.seed_cache();
    let mut all = f.round(1, T0);
    all.extend(f.core.on(trained(1), T0));
    all.extend(f.core.on(encoded(1), T0));
    assert!(exports(&all).is_empty());
}
