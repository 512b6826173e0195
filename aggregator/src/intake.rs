//! The upload intake, as a pure state machine (no async, no files, no clock): which chunk to
//! store where, and what a manifest means, as verdicts the event loop carries out.
//!
//! A client publishes its chunks first and its signed manifest last. So a chunk is judged on
//! what is known when it arrives (round admission, enrolment, the round's flood limits) and
//! stored at its offset in the upload's file; the manifest then names the layout, a
//! [`ChunkTracker`] checks the stored chunks against it, and either chunks are missing (ask
//! for them) or the blob is ready for [`verify_update`](crate::verify::verify_update).

use std::collections::{BTreeMap, HashMap};

use shared_proto::chunk::ChunkTracker;
use shared_proto::hash::parse_sha256_hex;
use shared_proto::message::{self, RejectReason, UpdateManifest};
use shared_proto::sign::PublicKey;
use shared_proto::ProtoError;

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
}

/// What to do with an update chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkVerdict {
    /// Write it at `offset` of the upload's file, then report it with [`UploadTable::stored`].
    Spool { offset: u64 },
    /// Drop it without touching the disk.
    Ignore(Ignored),
    /// The upload broke the round's limits: discard what is stored and ack the rejection.
    Reject(Rejection),
}

/// Why a chunk was dropped (a label of `zk0_aggregator_update_chunks_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not for the open round (closed, aggregating, stale, future) or already accepted.
    NotAdmitted,
    NotEnrolled,
    /// The upload was rejected; its next manifest may start it again.
    UploadRejected,
    /// Past the manifest's chunk count: junk, never part of the blob.
    PastCount,
    /// The upload's blob is being verified; the verdict settles it.
    Verifying,
}

impl Ignored {
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::NotAdmitted => "not_admitted",
            Ignored::NotEnrolled => "not_enrolled",
            Ignored::UploadRejected => "upload_rejected",
            Ignored::PastCount => "past_count",
            Ignored::Verifying => "verifying",
        }
    }
}

/// What a manifest means.
#[derive(Debug, Clone, PartialEq)]
pub enum ManifestVerdict {
    /// The update was already accepted with this hash: the client missed the ack; send it again.
    Reack,
    /// Ack the rejection; the upload (if any) stays as it is.
    Reject(Rejection),
    /// Ack the rejection and discard the upload's stored chunks.
    Discard(Rejection),
    /// Chunks lost on the way: ask for exactly these.
    AskMissing(Vec<u32>),
    /// Every chunk is stored: verify the blob (its length is `total_len`).
    ReadyToVerify(UpdateManifest),
    /// A verification of this upload is already under way: its verdict answers this manifest.
    Verifying,
}

/// After a chunk was stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    Wait,
    ReadyToVerify(Box<UpdateManifest>),
}

/// One client's upload in the open round.
#[derive(Debug, Default)]
struct Upload {
    round: u64,
    /// Stored chunks: index → length. Chunks come before the manifest that names the layout,
    /// so they are counted here first and checked by the tracker once it exists.
    chunks: BTreeMap<u32, u32>,
    bytes: u64,
    /// The accepted-for-verification manifest and its chunk tracker.
    manifest: Option<(UpdateManifest, ChunkTracker)>,
    verifying: bool,
    rejected: bool,
}

/// Every upload of the open round, keyed by client id.
#[derive(Debug, Default)]
pub struct UploadTable {
    uploads: HashMap<String, Upload>,
}

impl UploadTable {
    /// The client's upload for `round`, reset if it was for another round.
    fn entry(&mut self, cid: &str, round: u64) -> &mut Upload {
        let up = self.uploads.entry(cid.to_string()).or_default();
        if up.round != round {
            *up = Upload {
                round,
                ..Default::default()
            };
        }
        up
    }

    /// A new round opened: forget every upload.
    pub fn clear(&mut self) {
        self.uploads.clear();
    }

    /// After a restart: the chunks of `cid` already stored for `round` (index, length).
    pub fn resume(&mut self, cid: &str, round: u64, chunks: impl IntoIterator<Item = (u32, u32)>) {
        let up = self.entry(cid, round);
        for (i, len) in chunks {
            let prev = up.chunks.insert(i, len).unwrap_or(0);
            up.bytes = up.bytes - u64::from(prev) + u64::from(len);
        }
    }

    /// An update chunk `index` of `len` bytes from `cid` for `round`.
    pub fn on_chunk(
        &mut self,
        state: &RoundState,
        keys: &Keys,
        limits: &Limits,
        cid: &str,
        round: u64,
        index: u32,
        len: usize,
    ) -> ChunkVerdict {
        if state.admit(cid, round).is_err() {
            return ChunkVerdict::Ignore(Ignored::NotAdmitted);
        }
        if !keys.is_enrolled(cid) {
            return ChunkVerdict::Ignore(Ignored::NotEnrolled);
        }
        let up = self.entry(cid, round);
        if up.rejected {
            return ChunkVerdict::Ignore(Ignored::UploadRejected);
        }
        if up.verifying {
            return ChunkVerdict::Ignore(Ignored::Verifying);
        }
        let prev = up.chunks.get(&index).copied().map_or(0, u64::from);
        let flood = len > limits.chunk_size as usize
            || u64::from(index) >= limits.max_chunks()
            || up.bytes - prev + len as u64 > limits.max_update_bytes;
        if flood {
            let detail = format!(
                "chunk {index} of {len} bytes exceeds the round's limits ({} chunks of {} bytes, {} bytes total)",
                limits.max_chunks(),
                limits.chunk_size,
                limits.max_update_bytes
            );
            Self::reject(up);
            return ChunkVerdict::Reject(Rejection::new(RejectReason::ChunkFlood, detail));
        }
        match up.manifest.as_ref().map(|(_, t)| t.check(index, len)) {
            None | Some(Ok(_)) => {}
            Some(Err(ProtoError::ChunkIndex { .. })) => {
                return ChunkVerdict::Ignore(Ignored::PastCount)
            }
            Some(Err(e)) => {
                Self::reject(up);
                return ChunkVerdict::Reject(Rejection::proto("chunk", &e));
            }
        }
        // Every chunk but the last is `chunk_size` long (the manifest must agree): its offset
        // is known before the manifest is.
        ChunkVerdict::Spool {
            offset: u64::from(index) * u64::from(limits.chunk_size),
        }
    }

    /// Chunk `index` of `len` bytes is in the upload's file (a repeat replaces the earlier copy).
    pub fn stored(&mut self, cid: &str, round: u64, index: u32, len: usize) -> Stored {
        let up = self.entry(cid, round);
        let len = len as u32; // ≤ chunk_size, checked in `on_chunk`
        let prev = up.chunks.insert(index, len).unwrap_or(0);
        up.bytes = up.bytes - u64::from(prev) + u64::from(len);
        match &mut up.manifest {
            Some((m, tracker)) if !up.verifying => {
                tracker.mark(index);
                if tracker.is_complete() {
                    up.verifying = true;
                    Stored::ReadyToVerify(Box::new(m.clone()))
                } else {
                    Stored::Wait // resent chunks still on their way; the manifest follows them
                }
            }
            _ => Stored::Wait,
        }
    }

    /// A manifest payload from `cid` for `round`, checked in the documented order.
    pub fn on_manifest(
        &mut self,
        state: &RoundState,
        keys: &Keys,
        limits: &Limits,
        cid: &str,
        round: u64,
        payload: &[u8],
    ) -> ManifestVerdict {
        let reject = |r, d: String| ManifestVerdict::Reject(Rejection::new(r, d));
        let m = match message::decode::<UpdateManifest>(payload, MAX_MESSAGE_BYTES) {
            Ok(m) => m,
            Err(e) => return ManifestVerdict::Reject(Rejection::proto("manifest", &e)),
        };
        if m.client_id != cid || m.round != round {
            let detail = format!(
                "manifest names {}/{} but came on the topic of {cid}/{round}",
                m.client_id, m.round
            );
            return reject(RejectReason::MalformedMessage, detail);
        }
        if let Err(a) = state.admit(cid, round) {
            if a == Admission::Duplicate && same_hash(state, cid, &m.sha256) {
                return ManifestVerdict::Reack;
            }
            return ManifestVerdict::Reject(admission_rejection(a, round, state.round));
        }
        let key = match keys.clients.get(cid) {
            None => {
                return reject(
                    RejectReason::UnknownKey,
                    format!("{cid} has no enrolled key"),
                )
            }
            Some(Err(e)) => {
                return reject(
                    RejectReason::Internal,
                    format!("enrolled key unreadable: {e}"),
                )
            }
            Some(Ok(k)) => k,
        };
        if let Err(e) = m.verify_with(key) {
            return reject(
                RejectReason::BadSignature,
                format!("manifest signature: {e}"),
            );
        }
        if m.base_model_id != state.model_id {
            let detail = format!(
                "update is against model {} but round {round} trains {}",
                m.base_model_id, state.model_id
            );
            return reject(RejectReason::WrongBaseModel, detail);
        }
        let mut tracker = match check_manifest(&m, limits) {
            Ok(t) => t,
            Err(r) => return ManifestVerdict::Reject(r),
        };
        let up = self.entry(cid, round);
        if up.verifying {
            return ManifestVerdict::Verifying;
        }
        let mut bad = None;
        for (&i, &len) in &up.chunks {
            match tracker.check(i, len as usize) {
                Ok(_) => {
                    tracker.mark(i);
                }
                Err(ProtoError::ChunkIndex { .. }) => {} // past the count: not part of the blob
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = bad {
            Self::reject(up);
            return ManifestVerdict::Discard(Rejection::proto("chunk", &e));
        }
        up.rejected = false;
        let verdict = if tracker.is_complete() {
            up.verifying = true;
            ManifestVerdict::ReadyToVerify(m.clone())
        } else {
            // The client publishes its manifest after its chunks, so chunks still missing now
            // were lost on the way (a broker drops QoS 1 messages when a subscriber's backlog
            // overflows). Bounded by the manifest's count.
            ManifestVerdict::AskMissing(tracker.missing())
        };
        up.manifest = Some((m, tracker));
        verdict
    }

    /// The verifier accepted `cid`'s upload: it leaves the table.
    pub fn accepted(&mut self, cid: &str) {
        self.uploads.remove(cid);
    }

    /// The verifier (or the disk) refused `cid`'s upload for `round`; its file is discarded.
    pub fn refused(&mut self, cid: &str, round: u64) {
        if let Some(up) = self.uploads.get_mut(cid).filter(|u| u.round == round) {
            Self::reject(up);
        }
    }

    fn reject(up: &mut Upload) {
        up.rejected = true;
        up.verifying = false;
        up.manifest = None;
        up.chunks.clear();
        up.bytes = 0;
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
            client_id: "arm-a".into(),
            round: 1,
            base_model_id: f.state.model_id.clone(),
            codec: codec.to_string(),
            total_len: blob.len() as u64,
            chunk_count: shared_proto::chunk::chunk_count(blob.len(), CHUNK as usize),
            chunk_size: CHUNK,
            sha256: shared_proto::hash::sha256_hex(blob),
            examples: 10,
            metrics: ClientMetrics {
                loss: 1.0,
                fedprox_loss: 1.0,
                grad_norm: 1.0,
                update_norm: 0.0,
                steps: 1,
                seconds: 1.0,
            },
            signature: Vec::new(),
        };
        m.sign_with(&f.key);
        m
    }

    fn signed(f: &Fed, mut m: UpdateManifest) -> Vec<u8> {
        m.sign_with(&f.key);
        message::encode(&m)
    }

    impl Fed {
        fn chunk(&mut self, index: u32, len: usize) -> ChunkVerdict {
            self.table.on_chunk(
                &self.state,
                &self.keys,
                &self.limits,
                "arm-a",
                1,
                index,
                len,
            )
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
                    self.chunk(i, c.len()),
                    ChunkVerdict::Spool {
                        offset: u64::from(i * CHUNK)
                    }
                );
                out.push(self.table.stored("arm-a", 1, i, c.len()));
            }
            out
        }

        fn manifest(&mut self, payload: &[u8]) -> ManifestVerdict {
            self.table
                .on_manifest(&self.state, &self.keys, &self.limits, "arm-a", 1, payload)
        }

        fn rejected(&mut self, payload: &[u8]) -> RejectReason {
            match self.manifest(payload) {
                ManifestVerdict::Reject(r) | ManifestVerdict::Discard(r) => r.reason,
                v => panic!("expected a rejection, got {v:?}"),
            }
        }
    }

    #[test]
    fn chunks_then_manifest_are_ready_and_verify() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let stored = f.send_chunks(&b, |_| true);
        assert!(stored.iter().all(|s| *s == Stored::Wait), "no manifest yet");
        let m = manifest(&f, &b, Codec::F32);
        let ManifestVerdict::ReadyToVerify(ready) = f.manifest(&message::encode(&m)) else {
            panic!("not ready")
        };
        let v = verify_update(&ready, &b, &f.spec, &f.limits).unwrap();
        let expected = shared_proto::tensor::l2_norm_sq(&delta(0.1)).sqrt();
        assert!((v.norm - expected).abs() < 1e-6, "{} vs {expected}", v.norm);
        // While it is verified, the same manifest again starts nothing new.
        assert_eq!(f.manifest(&message::encode(&m)), ManifestVerdict::Verifying);
        assert_eq!(
            f.chunk(0, CHUNK as usize),
            ChunkVerdict::Ignore(Ignored::Verifying)
        );
    }

    #[test]
    fn lost_chunks_are_asked_for_and_a_resend_completes() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        assert!(b.len() > 3 * CHUNK as usize);
        f.send_chunks(&b, |i| i != 1 && i != 3);
        let payload = message::encode(&manifest(&f, &b, Codec::F32));
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
    fn a_duplicate_of_the_accepted_update_is_acked_again() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let m = manifest(&f, &b, Codec::F32);
        let v = verify_update(&m, &b, &f.spec, &f.limits).unwrap();
        f.state.record("arm-a", v.record(&m));
        f.table.accepted("arm-a");
        assert_eq!(f.manifest(&message::encode(&m)), ManifestVerdict::Reack);
        // The hash compares as bytes: upper-case hex is the same update.
        let mut upper = m.clone();
        upper.sha256 = upper.sha256.to_uppercase();
        assert_eq!(f.manifest(&signed(&f, upper)), ManifestVerdict::Reack);
        // Another update for an accepted round is a duplicate.
        let other = manifest(&f, &blob(0.2, Codec::F32), Codec::F32);
        assert_eq!(
            f.rejected(&message::encode(&other)),
            RejectReason::DuplicateUpdate
        );
        // Its chunks never reach the disk.
        assert_eq!(f.chunk(0, 10), ChunkVerdict::Ignore(Ignored::NotAdmitted));
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
        let mut forged = good.clone();
        forged.examples = 1_000_000; // changed after signing
        assert_eq!(
            f.rejected(&message::encode(&forged)),
            RejectReason::BadSignature
        );
        let m = with(&|m| m.base_model_id = "0".repeat(64));
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
        // An unenrolled client (its topic) has no key.
        let payload = signed(&f, with(&|m| m.client_id = "arm-z".into()));
        let v = f
            .table
            .on_manifest(&f.state, &f.keys, &f.limits, "arm-z", 1, &payload);
        assert!(matches!(v, ManifestVerdict::Reject(r) if r.reason == RejectReason::UnknownKey));
        // Rounds other than the open one.
        for round in [0, 2] {
            let payload = signed(&f, with(&|m| m.round = round));
            let v = f
                .table
                .on_manifest(&f.state, &f.keys, &f.limits, "arm-a", round, &payload);
            assert!(
                matches!(v, ManifestVerdict::Reject(ref r) if r.reason == RejectReason::LateOrOldRound),
                "{v:?}"
            );
        }
        // None of it disturbed the real upload.
        f.send_chunks(&b, |_| true);
        assert!(matches!(
            f.manifest(&message::encode(&good)),
            ManifestVerdict::ReadyToVerify(_)
        ));
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
        upper.sha256 = upper.sha256.to_uppercase();
        verify_update(&upper, &b, &f.spec, &f.limits).unwrap();
    }

    #[test]
    fn a_flood_rejects_the_upload_and_its_later_chunks_are_dropped() {
        for (index, len) in [(0, CHUNK as usize + 1), (64, 1)] {
            let mut f = fed();
            let v = f.chunk(index, len);
            assert!(
                matches!(v, ChunkVerdict::Reject(ref r) if r.reason == RejectReason::ChunkFlood),
                "chunk {index} of {len}: {v:?}"
            );
            assert_eq!(
                f.chunk(1, 10),
                ChunkVerdict::Ignore(Ignored::UploadRejected)
            );
        }
        // Total bytes past max_update_bytes (4096 = 64 full chunks), even with in-range indices.
        let mut f = fed();
        f.limits.max_update_bytes = 4 * u64::from(CHUNK) - 1;
        for i in 0..3 {
            assert!(matches!(
                f.chunk(i, CHUNK as usize),
                ChunkVerdict::Spool { .. }
            ));
            f.table.stored("arm-a", 1, i, CHUNK as usize);
        }
        assert!(matches!(
            f.chunk(3, CHUNK as usize),
            ChunkVerdict::Reject(_)
        ));
        // A repeat replaces its earlier copy rather than counting twice.
        let mut f = fed();
        f.limits.max_update_bytes = 2 * u64::from(CHUNK);
        for _ in 0..5 {
            assert!(matches!(
                f.chunk(0, CHUNK as usize),
                ChunkVerdict::Spool { .. }
            ));
            f.table.stored("arm-a", 1, 0, CHUNK as usize);
        }
        // A fresh valid manifest starts the rejected upload again.
        let mut f = fed();
        f.chunk(0, CHUNK as usize + 1);
        let b = blob(0.1, Codec::F32);
        let payload = message::encode(&manifest(&f, &b, Codec::F32));
        assert!(
            matches!(f.manifest(&payload), ManifestVerdict::AskMissing(ref m) if m.len() as u32 == b.len().div_ceil(CHUNK as usize) as u32)
        );
    }

    #[test]
    fn chunks_of_a_wrong_length_or_past_the_count() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let m = manifest(&f, &b, Codec::F32);
        // A chunk stored one byte short: the layout says every chunk but the last is full.
        f.chunk(0, CHUNK as usize - 1);
        f.table.stored("arm-a", 1, 0, CHUNK as usize - 1);
        assert!(matches!(
            f.manifest(&message::encode(&m)),
            ManifestVerdict::Discard(ref r) if r.reason == RejectReason::MalformedMessage
        ));
        // Past the manifest's count (but within the round's limits): junk, not stored.
        let mut f = fed();
        let m = manifest(&f, &b, Codec::F32); // signed by this federation's key
        f.send_chunks(&b, |i| i == 0);
        assert!(matches!(
            f.manifest(&message::encode(&m)),
            ManifestVerdict::AskMissing(_)
        ));
        assert_eq!(
            f.chunk(m.chunk_count + 2, CHUNK as usize),
            ChunkVerdict::Ignore(Ignored::PastCount)
        );
    }

    #[test]
    fn after_the_deadline_nothing_is_admitted() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
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
            f.chunk(1, CHUNK as usize),
            ChunkVerdict::Ignore(Ignored::NotAdmitted)
        );
        let payload = message::encode(&manifest(&f, &b, Codec::F32));
        assert_eq!(f.rejected(&payload), RejectReason::LateOrOldRound);
    }

    #[test]
    fn unenrolled_chunks_never_touch_the_disk() {
        let mut f = fed();
        let v = f
            .table
            .on_chunk(&f.state, &f.keys, &f.limits, "arm-z", 1, 0, 10);
        assert_eq!(v, ChunkVerdict::Ignore(Ignored::NotEnrolled));
    }

    #[test]
    fn a_restart_resumes_from_the_stored_chunks() {
        let mut f = fed();
        let b = blob(0.1, Codec::F32);
        let lens: Vec<(u32, u32)> = shared_proto::chunk::split(&b, CHUNK as usize)
            .enumerate()
            .map(|(i, c)| (i as u32, c.len() as u32))
            .collect();
        f.table
            .resume("arm-a", 1, lens.into_iter().filter(|&(i, _)| i != 2));
        let payload = message::encode(&manifest(&f, &b, Codec::F32));
        assert_eq!(f.manifest(&payload), ManifestVerdict::AskMissing(vec![2]));
    }
}
