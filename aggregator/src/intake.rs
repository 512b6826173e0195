//! The upload intake, as a pure state machine (no async, no files, no clock): which chunk to
//! store where, and what a manifest means, as verdicts the event loop carries out.
//!
//! A client publishes its signed manifest first; the aggregator checks it (signature,
//! round, base model, limits) and answers with the chunks it wants (all of them at first).
//! The manifest lists every chunk's SHA-256, so each chunk is checked before it is stored:
//! a chunk anyone else injects on the client's topics (a wrong hash, a wrong length, an index
//! past the count, or no manifest yet) is dropped and counted, and never costs the client its
//! upload. Once every chunk is stored the blob goes to
//! [`verify_update`](crate::verify::verify_update).

use std::collections::{BTreeMap, HashMap};

use shared_proto::chunk::ChunkTracker;
use shared_proto::hash::{parse_sha256_hex, sha256};
use shared_proto::message::{self, RejectReason, UpdateManifest};
use shared_proto::sign::PublicKey;
use shared_proto::Sha256Hex;

use crate::round::{Admission, RoundState};
use crate::store::KeyRegistry;
use crate::verify::{check_manifest, Limits, Rejection};

/// Largest CBOR control message accepted (manifests, statuses).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// The enrolled keys, parsed once per change of `keys.json` (not once per manifest).
#[derive(Debug, Default, Clone)]
pub struct Keys {
    clients: BTreeMap<String, Result<PublicKey, String>>,
}

impl Keys {
    pub fn from_registry(reg: &KeyRegistry) -> Self {
        let clients = reg
            .clients
            .iter()
            .map(|(cid, k)| {
                let key = PublicKey::from_pem(&k.public_key_pem).map_err(|e| e.to_string());
                (cid.clone(), key)
            })
            .collect();
        Keys { clients }
    }

    pub fn is_enrolled(&self, cid: &str) -> bool {
        self.clients.contains_key(cid)
    }

    /// The enrolled key of `cid`, or why there is none to check with.
    pub fn get(&self, cid: &str) -> Result<&PublicKey, Rejection> {
        match self.clients.get(cid) {
            None => Err(Rejection::new(
                RejectReason::UnknownKey,
                format!("{cid} has no enrolled key"),
            )),
            Some(Err(e)) => Err(Rejection::new(
                RejectReason::Internal,
                format!("enrolled key unreadable: {e}"),
            )),
            Some(Ok(k)) => Ok(k),
        }
    }
}

/// What the intake judges against: the open round, the enrolled keys, the limits and the
/// federation name every signed manifest must carry.
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a> {
    pub state: &'a RoundState,
    pub keys: &'a Keys,
    pub limits: &'a Limits,
    pub federation: &'a str,
}

/// What to do with an update chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkVerdict {
    /// It matches its signed hash: write it at `offset` of the upload's file, then report it
    /// with [`UploadTable::stored`].
    Spool { offset: u64 },
    /// Drop it without touching the disk.
    Ignore(Ignored),
}

/// Why a chunk was dropped (a label of `zk0_aggregator_update_chunks_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not for the open round (closed, aggregating, stale, future) or already accepted.
    NotAdmitted,
    NotEnrolled,
    /// No accepted manifest for this upload yet (chunks are asked for after it).
    NoManifest,
    /// Past the manifest's chunk count.
    PastCount,
    /// Its length or SHA-256 is not the one the signed manifest lists: injected, or corrupt.
    Forged,
    /// This chunk is stored already.
    Duplicate,
    /// The upload's blob is being verified; the verdict settles it.
    Verifying,
}

impl Ignored {
    pub const ALL: [Ignored; 7] = [
        Ignored::NotAdmitted,
        Ignored::NotEnrolled,
        Ignored::NoManifest,
        Ignored::PastCount,
        Ignored::Forged,
        Ignored::Duplicate,
        Ignored::Verifying,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::NotAdmitted => "not_admitted",
            Ignored::NotEnrolled => "not_enrolled",
            Ignored::NoManifest => "no_manifest",
            Ignored::PastCount => "past_count",
            Ignored::Forged => "forged",
            Ignored::Duplicate => "duplicate",
            Ignored::Verifying => "verifying",
        }
    }
}

/// What a manifest means, and which blob the answer is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The manifest's `sha256` (empty when it did not decode): the ack names it, so the client
    /// knows the answer is about its blob.
    pub sha256: Sha256Hex,
    pub verdict: ManifestVerdict,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ManifestVerdict {
    /// The update was already accepted with this hash: the client missed the ack; send it again.
    Reack,
    /// Ack the rejection; an upload already under way stays as it is.
    Reject(Rejection),
    /// Ask for exactly these chunks (all of them for a new manifest).
    AskMissing(Vec<u32>),
    /// A new signed blob replaces the one stored so far (the client trained again): discard
    /// the upload's file, then ask for these chunks.
    Replace(Vec<u32>),
    /// Every chunk is stored: verify the blob.
    ReadyToVerify(Box<UpdateManifest>),
    /// A verification of this upload is already under way: its verdict answers this manifest.
    Verifying,
}

/// After a chunk was stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    Wait,
    ReadyToVerify(Box<UpdateManifest>),
}

/// One client's upload in the open round: its verified manifest and which chunks are stored.
#[derive(Debug)]
struct Upload {
    round: u64,
    manifest: UpdateManifest,
    tracker: ChunkTracker,
    verifying: bool,
}

/// Every upload of the open round, keyed by client id.
#[derive(Debug, Default)]
pub struct UploadTable {
    uploads: HashMap<String, Upload>,
}

impl UploadTable {
    /// A new round opened: forget every upload.
    pub fn clear(&mut self) {
        self.uploads.clear();
    }

    fn get(&mut self, cid: &str, round: u64) -> Option<&mut Upload> {
        self.uploads.get_mut(cid).filter(|u| u.round == round)
    }

    /// After a restart: the manifest `payload` stored for `cid`'s upload and the chunks
    /// already written (each was checked against its hash before it was). Returns what the
    /// manifest means now (the round may have moved on).
    pub fn resume(
        &mut self,
        gate: Gate<'_>,
        cid: &str,
        round: u64,
        payload: &[u8],
        chunks: impl IntoIterator<Item = u32>,
    ) -> Answer {
        let answer = self.on_manifest(gate, cid, round, payload);
        let Some(up) = self.get(cid, round) else {
            return answer;
        };
        for i in chunks {
            if i < up.tracker.chunk_count() {
                up.tracker.mark(i);
            }
        }
        let verdict = match answer.verdict {
            ManifestVerdict::AskMissing(_) | ManifestVerdict::Replace(_)
                if up.tracker.is_complete() =>
            {
                up.verifying = true;
                ManifestVerdict::ReadyToVerify(Box::new(up.manifest.clone()))
            }
            ManifestVerdict::AskMissing(_) | ManifestVerdict::Replace(_) => {
                ManifestVerdict::AskMissing(up.tracker.missing())
            }
            other => other,
        };
        Answer { verdict, ..answer }
    }

    /// An update chunk `index` from `cid` for `round`.
    pub fn on_chunk(
        &mut self,
        gate: Gate<'_>,
        cid: &str,
        round: u64,
        index: u32,
        payload: &[u8],
    ) -> ChunkVerdict {
        use ChunkVerdict::Ignore;
        if gate.state.admit(cid, round).is_err() {
            return Ignore(Ignored::NotAdmitted);
        }
        if !gate.keys.is_enrolled(cid) {
            return Ignore(Ignored::NotEnrolled);
        }
        let Some(up) = self.get(cid, round) else {
            return Ignore(Ignored::NoManifest);
        };
        if up.verifying {
            return Ignore(Ignored::Verifying);
        }
        let Ok(len) = up.tracker.expected_len(index) else {
            return Ignore(Ignored::PastCount);
        };
        if up.tracker.is_received(index) {
            return Ignore(Ignored::Duplicate);
        }
        let hash_ok = up.manifest.chunk_hash(index) == Some(&sha256(payload)[..]);
        if payload.len() != len || !hash_ok {
            return Ignore(Ignored::Forged);
        }
        ChunkVerdict::Spool {
            offset: up.tracker.offset(index),
        }
    }

    /// Chunk `index` is in the upload's file.
    pub fn stored(&mut self, cid: &str, round: u64, index: u32) -> Stored {
        let Some(up) = self.get(cid, round) else {
            return Stored::Wait;
        };
        up.tracker.mark(index);
        if !up.verifying && up.tracker.is_complete() {
            up.verifying = true;
            return Stored::ReadyToVerify(Box::new(up.manifest.clone()));
        }
        Stored::Wait
    }

    /// A manifest payload from `cid` for `round`, checked in the documented order.
    pub fn on_manifest(&mut self, gate: Gate<'_>, cid: &str, round: u64, payload: &[u8]) -> Answer {
        let m = match message::decode::<UpdateManifest>(payload, MAX_MESSAGE_BYTES) {
            Ok(m) => m,
            Err(e) => {
                return Answer {
                    sha256: Sha256Hex::default(),
                    verdict: ManifestVerdict::Reject(Rejection::proto("manifest", &e)),
                }
            }
        };
        let sha256 = m.sha256.clone();
        let verdict = match self.judge(gate, cid, round, m) {
            Ok(v) | Err(v) => v,
        };
        Answer { sha256, verdict }
    }

    /// The manifest's checks, then its effect on the table (`Err` short-circuits a verdict).
    fn judge(
        &mut self,
        gate: Gate<'_>,
        cid: &str,
        round: u64,
        m: UpdateManifest,
    ) -> Result<ManifestVerdict, ManifestVerdict> {
        let reject = |r, d: String| ManifestVerdict::Reject(Rejection::new(r, d));
        if m.client_id != cid || m.round != round || m.federation != gate.federation {
            let detail = format!(
                "manifest names {}/{}/{} but came on the topic of {}/{cid}/{round}",
                m.federation, m.client_id, m.round, gate.federation
            );
            return Err(reject(RejectReason::MalformedMessage, detail));
        }
        if let Err(a) = gate.state.admit(cid, round) {
            if a == Admission::Duplicate && same_hash(gate.state, cid, &m.sha256) {
                return Err(ManifestVerdict::Reack);
            }
            return Err(ManifestVerdict::Reject(admission_rejection(
                a,
                round,
                gate.state.round,
            )));
        }
        let key = gate.keys.get(cid).map_err(ManifestVerdict::Reject)?;
        if let Err(e) = m.verify_with(key) {
            let detail = format!("manifest signature: {e}");
            return Err(reject(RejectReason::BadSignature, detail));
        }
        if m.base_model_id != gate.state.model_id {
            let detail = format!(
                "update is against model {} but round {round} trains {}",
                m.base_model_id, gate.state.model_id
            );
            return Err(reject(RejectReason::WrongBaseModel, detail));
        }
        let tracker = check_manifest(&m, gate.limits).map_err(ManifestVerdict::Reject)?;
        let replaces = match self.get(cid, round) {
            Some(up) if up.manifest.sha256_bytes().ok() == m.sha256_bytes().ok() => {
                return Ok(if up.verifying {
                    ManifestVerdict::Verifying
                } else {
                    ManifestVerdict::AskMissing(up.tracker.missing())
                });
            }
            Some(up) if up.verifying => return Ok(ManifestVerdict::Verifying),
            Some(_) => true,
            None => false,
        };
        let mut up = Upload {
            round,
            manifest: m,
            tracker,
            verifying: false,
        };
        let verdict = if up.tracker.is_complete() {
            // An empty blob has no chunks to wait for.
            up.verifying = true;
            ManifestVerdict::ReadyToVerify(Box::new(up.manifest.clone()))
        } else if replaces {
            ManifestVerdict::Replace(up.tracker.missing())
        } else {
            ManifestVerdict::AskMissing(up.tracker.missing())
        };
        self.uploads.insert(cid.to_string(), up);
        Ok(verdict)
    }

    /// The verifier accepted `cid`'s upload: it leaves the table.
    pub fn accepted(&mut self, cid: &str) {
        self.uploads.remove(cid);
    }

    /// The verifier (or the disk) refused `cid`'s upload for `round`: it leaves the table, so
    /// a new manifest starts it again.
    pub fn refused(&mut self, cid: &str, round: u64) {
        if self.get(cid, round).is_some() {
            self.uploads.remove(cid);
        }
    }
}

/// Whether the update already accepted from `cid` has this hash (compared as bytes, so the
/// hex's case does not matter).
fn same_hash(state: &RoundState, cid: &str, sha256: &str) -> bool {
    let Some(rec) = state.accepted.get(cid) else {
        return false;
    };
    matches!(
        (parse_sha256_hex(&rec.sha256), parse_sha256_hex(sha256)),
        (Ok(a), Ok(b)) if a == b
    )
}

fn admission_rejection(a: Admission, round: u64, current: u64) -> Rejection {
    let (reason, detail) = match a {
        Admission::StaleRound => (
            RejectReason::LateOrOldRound,
            format!("round {round} is over; current is {current}"),
        ),
        Admission::FutureRound => (
            RejectReason::LateOrOldRound,
            format!("round {round} was never announced; current is {current}"),
        ),
        Admission::NotCollecting => (
            RejectReason::LateOrOldRound,
            format!("round {round} is not collecting"),
        ),
        Admission::Duplicate => (
            RejectReason::DuplicateUpdate,
            format!("an update for round {round} was already accepted"),
        ),
    };
    Rejection::new(reason, detail)
}

#[cfg(test)]
mod tests {
    //! The intake and the verifier against each other, as the event loop drives them: no
    //! broker, no disk.

    use std::collections::BTreeSet;

    use shared_proto::codec::{encode_delta, Codec, EncodeOptions};
    use shared_proto::message::{ClientMetrics, PROTOCOL_VERSION};
    use shared_proto::sign::KeyPair;
    use shared_proto::tensor::{ModelSpec, Tensor, TensorSet};

    use super::*;
    use crate::round::{RoundConfig, Transition};
    use crate::store::EnrolledKey;
    use crate::verify::verify_update;

    const CHUNK: u32 = 64;

    struct Fed {
        state: RoundState,
        keys: Keys,
        limits: Limits,
        spec: ModelSpec,
        table: UploadTable,
        key: KeyPair,
    }

    fn delta(scale: f32) -> TensorSet {
        let mut d = TensorSet::new();
        let vals = (0..100).map(|i| scale * (i as f32).sin()).collect();
        d.insert("w".into(), Tensor::new(vec![100], vals).unwrap());
        d
    }

    fn blob(scale: f32, codec: Codec) -> Vec<u8> {
        let opts = EncodeOptions {
            codec,
            zstd_level: 1,
        };
        encode_delta(&delta(scale), &opts, None).unwrap()
    }

    /// Round 1 collecting, `arm-a` enrolled and selected.
    fn fed() -> Fed {
        let key = KeyPair::generate();
        let mut reg = KeyRegistry::default();
        reg.clients.insert(
            "arm-a".into(),
            EnrolledKey {
                public_key_pem: key.public().to_pem(),
                fingerprint: key.public().fingerprint(),
                enrolled_unix_ms: 0,
            },
        );
        let mut state = RoundState::new("m".repeat(64));
        let online: BTreeSet<String> = ["arm-a".to_string()].into();
        assert_eq!(
            state.tick(&round_cfg(), &online, 1_000),
            Some(Transition::Announce)
        );
        Fed {
            state,
            keys: Keys::from_registry(&reg),
            limits: Limits {
                chunk_size: CHUNK,
                max_update_bytes: 4096,
                max_update_norm: 0.0,
                max_examples: 1_000_000,
                accepted_codecs: vec![Codec::F32, Codec::Int8],
            },
            spec: ModelSpec::from_tensors(&delta(1.0)),
            table: UploadTable::default(),
            key,
        }
    }

    fn round_cfg() -> RoundConfig {
        RoundConfig {
            rounds: 3,
            min_clients: 1,
            max_clients: 0,
            fraction: 1.0,
            round_timeout_ms: 10_000,
        }
    }

    fn manifest(f: &Fed, blob: &[u8], codec: Codec) -> UpdateManifest {
        let mut m = UpdateManifest {
            v: PROTOCOL_VERSION,
            federation: "lab".into(),
            client_id: "arm-a".into(),
            round: 1,
            base_model_id: f.state.model_id.clone(),
            codec: codec.to_string(),
            total_len: 0,
            chunk_count: 0,
            chunk_size: 0,
            sha256: Default::default(),
            examples: 10,
            metrics: ClientMetrics {
                loss: 1.0,
                fedprox_loss: 1.0,
                grad_norm: 1.0,
                update_norm: 0.0,
                steps: 1,
                seconds: 1.0,
            },
            chunk_sha256: Vec::new(),
            signature: Vec::new(),
        };
        m.describe_blob(blob, CHUNK);
        m.sign_with(&f.key);
        m
    }

    fn signed(f: &Fed, mut m: UpdateManifest) -> Vec<u8> {
        m.sign_with(&f.key);
        message::encode(&m)
    }

    fn all(blob: &[u8]) -> Vec<u32> {
        (0..blob.len().div_ceil(CHUNK as usize) as u32).collect()
    }

    impl Fed {
        fn gate(&self) -> Gate<'_> {
            Gate {
                state: &self.state,
                keys: &self.keys,
                limits: &self.limits,
                federation: "lab",
            }
        }

        fn chunk(&mut self, index: u32, bytes: &[u8]) -> ChunkVerdict {
            let gate = Gate {
                state: &self.state,
                keys: &self.keys,
                limits: &self.limits,
                federation: "lab",
            };
            self.table.on_chunk(gate, "arm-a", 1, index, bytes)
        }

        /// Sends (and "stores") the chunks of `blob` whose index `keep` allows.
        fn send_chunks(&mut self, blob: &[u8], keep: impl Fn(u32) -> bool) -> Vec<Stored> {
            let mut out = Vec::new();
            for (i, c) in shared_proto::chunk::split(blob, CHUNK as usize).enumerate() {
                let i = i as u32;
                if !keep(i) {
                    continue;
                }
                assert_eq!(
                    self.chunk(i, c),
                    ChunkVerdict::Spool {
                        offset: u64::from(i * CHUNK)
                    }
                );
                out.push(self.table.stored("arm-a", 1, i));
            }
            out
        }

        fn manifest(&mut self, payload: &[u8]) -> ManifestVerdict {
            self.manifest_as("arm-a", 1, payload)
        }

        fn manifest_as(&mut self, cid: &str, round: u64, payload: &[u8]) -> ManifestVerdict {
            let gate = Gate {
                state: &self.state,
                keys: &self.keys,
                limits: &self.limits,
                federation: "lab",
            };
            self.table.on_manifest(gate, cid, round, payload).verdict
        }

        fn rejected(&mut self, payload: &[u8]) -> RejectReason {
            match self.manifest(payload) {
                ManifestVerdict::Reject(r) => r.reason,
                v => panic!("expected a rejection, got {v:?}"),
            }
        }
    }

    #[test]
    fn manifest_first_then_chunks_are_ready_and_verify() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let m = manifest(&f, &b, Codec::F32);
        let mut table = UploadTable::default();
        let answer = table.on_manifest(f.gate(), "arm-a", 1, &message::encode(&m));
        assert_eq!(answer.sha256, m.sha256, "the answer names the blob");
        assert_eq!(answer.verdict, ManifestVerdict::AskMissing(all(&b)));
        f.table = table;
        let stored = f.send_chunks(&b, |_| true);
        let Some(Stored::ReadyToVerify(ready)) = stored.last() else {
            panic!("not ready: {stored:?}")
        };
        let v = verify_update(ready, &b, &f.spec, &f.limits).unwrap();
        let expected = shared_proto::tensor::l2_norm_sq(&delta(0.1)).sqrt();
        assert!((v.norm - expected).abs() < 1e-6, "{} vs {expected}", v.norm);
        // While it is verified, the same manifest again starts nothing new.
        assert_eq!(f.manifest(&message::encode(&m)), ManifestVerdict::Verifying);
        assert_eq!(
            f.chunk(0, &b[..CHUNK as usize]),
            ChunkVerdict::Ignore(Ignored::Verifying)
        );
    }

    #[test]
    fn chunks_before_the_manifest_are_not_stored() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        assert_eq!(
            f.chunk(0, &b[..CHUNK as usize]),
            ChunkVerdict::Ignore(Ignored::NoManifest)
        );
    }

    #[test]
    fn injected_chunks_are_dropped_and_the_real_ones_still_complete_the_upload() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let payload = message::encode(&manifest(&f, &b, Codec::F32));
        f.manifest(&payload);
        let n = all(&b).len() as u32;
        // Someone else's bytes on the client's chunk topics: right length, wrong hash; wrong
        // length; past the count; the real chunk 0's bytes at index 1.
        let junk = vec![0xAA; CHUNK as usize];
        assert_eq!(f.chunk(0, &junk), ChunkVerdict::Ignore(Ignored::Forged));
        assert_eq!(f.chunk(0, &b[..10]), ChunkVerdict::Ignore(Ignored::Forged));
        assert_eq!(f.chunk(n, &junk), ChunkVerdict::Ignore(Ignored::PastCount));
        assert_eq!(
            f.chunk(1, &b[..CHUNK as usize]),
            ChunkVerdict::Ignore(Ignored::Forged)
        );
        // The real chunks, one repeated.
        f.send_chunks(&b, |i| i == 0);
        assert_eq!(
            f.chunk(0, &b[..CHUNK as usize]),
            ChunkVerdict::Ignore(Ignored::Duplicate)
        );
        let s = f.send_chunks(&b, |i| i != 0);
        assert!(matches!(s.last(), Some(Stored::ReadyToVerify(_))));
    }

    #[test]
    fn a_resent_manifest_asks_for_what_is_still_missing() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        assert!(b.len() > 3 * CHUNK as usize);
        let payload = message::encode(&manifest(&f, &b, Codec::F32));
        f.manifest(&payload);
        f.send_chunks(&b, |i| i != 1 && i != 3);
        assert_eq!(
            f.manifest(&payload),
            ManifestVerdict::AskMissing(vec![1, 3])
        );
        // The client resends chunk 1 then 3: the last one completes the blob.
        let s = f.send_chunks(&b, |i| i == 1 || i == 3);
        assert_eq!(s[0], Stored::Wait);
        assert!(matches!(s[1], Stored::ReadyToVerify(_)));
    }

    #[test]
    fn a_new_blob_replaces_the_upload_under_way() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        f.manifest(&message::encode(&manifest(&f, &b, Codec::F32)));
        f.send_chunks(&b, |i| i == 0);
        let b2 = blob(0.3, Codec::F32);
        let m2 = message::encode(&manifest(&f, &b2, Codec::F32));
        assert_eq!(f.manifest(&m2), ManifestVerdict::Replace(all(&b2)));
        // The first blob's chunks no longer fit.
        assert_eq!(
            f.chunk(1, &b[CHUNK as usize..2 * CHUNK as usize]),
            ChunkVerdict::Ignore(Ignored::Forged)
        );
        let s = f.send_chunks(&b2, |_| true);
        assert!(matches!(s.last(), Some(Stored::ReadyToVerify(_))));
    }

    #[test]
    fn a_duplicate_of_the_accepted_update_is_acked_again() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let m = manifest(&f, &b, Codec::F32);
        let v = verify_update(&m, &b, &f.spec, &f.limits).unwrap();
        f.state.record("arm-a", v.record(&m, None));
        f.table.accepted("arm-a");
        assert_eq!(f.manifest(&message::encode(&m)), ManifestVerdict::Reack);
        // The hash compares as bytes: upper-case hex is the same update.
        let mut upper = m.clone();
        upper.sha256 = upper.sha256.to_uppercase().into();
        assert_eq!(f.manifest(&signed(&f, upper)), ManifestVerdict::Reack);
        // Another update for an accepted round is a duplicate.
        let other = manifest(&f, &blob(0.2, Codec::F32), Codec::F32);
        assert_eq!(
            f.rejected(&message::encode(&other)),
            RejectReason::DuplicateUpdate
        );
        // Its chunks never reach the disk.
        assert_eq!(
            f.chunk(0, &b[..10]),
            ChunkVerdict::Ignore(Ignored::NotAdmitted)
        );
    }

    #[test]
    fn each_manifest_rejection_has_its_reason() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let good = manifest(&f, &b, Codec::F32);
        let with = |change: &dyn Fn(&mut UpdateManifest)| {
            let mut m = good.clone();
            change(&mut m);
            m
        };
        assert_eq!(f.rejected(b"\xff\x00junk"), RejectReason::MalformedMessage);
        let m = with(&|m| m.round = 2);
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::MalformedMessage);
        let m = with(&|m| m.federation = "other-lab".into());
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::MalformedMessage);
        let mut forged = good.clone();
        forged.examples = 1_000_000; // changed after signing
        assert_eq!(
            f.rejected(&message::encode(&forged)),
            RejectReason::BadSignature
        );
        let m = with(&|m| m.base_model_id = "0".repeat(64).into());
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::WrongBaseModel);
        let m = with(&|m| m.codec = "bf16".into());
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::UnsupportedCodec);
        let m = with(&|m| m.codec = "zip".into());
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::UnsupportedCodec);
        let m = with(&|m| m.examples = 0);
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::MalformedMessage);
        let m = with(&|m| {
            m.total_len = 5000;
            m.chunk_count = 79;
        });
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::Oversize);
        let m = with(&|m| m.chunk_count += 1);
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::MalformedMessage);
        let m = with(&|m| {
            m.chunk_size = 32;
            m.chunk_count = (m.total_len as u32).div_ceil(32);
        });
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::MalformedMessage);
        let m = with(&|m| {
            m.chunk_sha256.truncate(32);
        });
        assert_eq!(f.rejected(&signed(&f, m)), RejectReason::MalformedMessage);
        // An unenrolled client (its topic) has no key.
        let payload = signed(&f, with(&|m| m.client_id = "arm-z".into()));
        let v = f.manifest_as("arm-z", 1, &payload);
        assert!(matches!(v, ManifestVerdict::Reject(r) if r.reason == RejectReason::UnknownKey));
        // Rounds other than the open one.
        for round in [0, 2] {
            let payload = signed(&f, with(&|m| m.round = round));
            let v = f.manifest_as("arm-a", round, &payload);
            assert!(
                matches!(v, ManifestVerdict::Reject(ref r) if r.reason == RejectReason::LateOrOldRound),
                "{v:?}"
            );
        }
        // None of it disturbed the real upload.
        assert_eq!(
            f.manifest(&message::encode(&good)),
            ManifestVerdict::AskMissing(all(&b))
        );
        let s = f.send_chunks(&b, |_| true);
        assert!(matches!(s.last(), Some(Stored::ReadyToVerify(_))));
    }

    #[test]
    fn each_blob_rejection_has_its_reason() {
        let f = fed();
        let b = blob(0.1, Codec::F32);
        let m = manifest(&f, &b, Codec::F32);
        let reason = |m: &UpdateManifest, blob: &[u8], limits: &Limits| {
            verify_update(m, blob, &f.spec, limits).unwrap_err().reason
        };
        assert_eq!(
            reason(&m, &b[1..], &f.limits),
            RejectReason::MalformedMessage
        );
        let mut flipped = b.clone();
        flipped[5] ^= 1;
        assert_eq!(reason(&m, &flipped, &f.limits), RejectReason::HashMismatch);
        // A blob of another codec than the manifest declares.
        let int8 = blob(0.1, Codec::Int8);
        let lying = manifest(&f, &int8, Codec::F32);
        assert_eq!(
            reason(&lying, &int8, &f.limits),
            RejectReason::UnsupportedCodec
        );
        // A delta of the wrong shape.
        let mut d = TensorSet::new();
        d.insert("w".into(), Tensor::new(vec![3], vec![0.0; 3]).unwrap());
        let wrong = encode_delta(
            &d,
            &EncodeOptions {
                codec: Codec::F32,
                zstd_level: 1,
            },
            None,
        )
        .unwrap();
        let wm = manifest(&f, &wrong, Codec::F32);
        assert_eq!(reason(&wm, &wrong, &f.limits), RejectReason::ShapeMismatch);
        // The norm bound.
        let tight = Limits {
            max_update_norm: 0.01,
            ..f.limits.clone()
        };
        assert_eq!(reason(&m, &b, &tight), RejectReason::NormBound);
        // Upper-case hex names the same hash.
        let mut upper = m.clone();
        upper.sha256 = upper.sha256.to_uppercase().into();
        verify_update(&upper, &b, &f.spec, &f.limits).unwrap();
    }

    #[test]
    fn after_the_deadline_nothing_is_admitted() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let payload = message::encode(&manifest(&f, &b, Codec::F32));
        f.manifest(&payload);
        f.send_chunks(&b, |i| i == 0);
        let online: BTreeSet<String> = ["arm-a".to_string()].into();
        assert!(
            f.state.tick(&round_cfg(), &online, 5_000).is_none(),
            "before the deadline"
        );
        assert!(matches!(
            f.state.tick(&round_cfg(), &online, 11_000),
            Some(Transition::Close { .. })
        ));
        assert_eq!(
            f.chunk(1, &b[CHUNK as usize..2 * CHUNK as usize]),
            ChunkVerdict::Ignore(Ignored::NotAdmitted)
        );
        assert_eq!(f.rejected(&payload), RejectReason::LateOrOldRound);
    }

    #[test]
    fn unenrolled_chunks_never_touch_the_disk() {
        let f = fed();
        let mut table = UploadTable::default();
        let v = table.on_chunk(f.gate(), "arm-z", 1, 0, &[0; 10]);
        assert_eq!(v, ChunkVerdict::Ignore(Ignored::NotEnrolled));
    }

    #[test]
    fn a_restart_resumes_from_the_stored_manifest_and_chunks() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let payload = message::encode(&manifest(&f, &b, Codec::F32));
        let n = all(&b).len() as u32;
        let gate = f.gate();
        let mut table = UploadTable::default();
        let a = table.resume(gate, "arm-a", 1, &payload, (0..n).filter(|&i| i != 2));
        assert_eq!(a.verdict, ManifestVerdict::AskMissing(vec![2]));
        // All stored before the crash: verify at once.
        let mut table = UploadTable::default();
        let a = table.resume(gate, "arm-a", 1, &payload, 0..n);
        assert!(matches!(a.verdict, ManifestVerdict::ReadyToVerify(_)));
        // A manifest that no longer passes (the round moved on) is refused.
        f.state.model_id = "n".repeat(64).into();
        let mut table = UploadTable::default();
        let a = table.resume(f.gate(), "arm-a", 1, &payload, 0..n);
        assert!(
            matches!(a.verdict, ManifestVerdict::Reject(r) if r.reason == RejectReason::WrongBaseModel)
        );
    }
}
