//! Verifying an update, as pure functions: a manifest's own fields, then its blob.
//!
//! The order is the one `docs/federation.md` states, cheap before costly: the manifest's fields
//! ([`check_manifest`], run by the intake once the signature is good, before a single chunk is
//! trusted), then the blob ([`verify_update`], once every chunk is in): length, SHA-256, decode
//! against the model spec, the blob's codec against the manifest's, the norm bound.

use shared_proto::chunk::ChunkTracker;
use shared_proto::codec::{decode_delta_each, Codec};
use shared_proto::hash::{parse_sha256_hex, sha256};
use shared_proto::message::{RejectReason, UpdateManifest};
use shared_proto::tensor::ModelSpec;
use shared_proto::ProtoError;

use crate::round::UpdateRecord;

/// Why an update was refused: the reason acked to the client and counted in the metrics, and
/// a detail for the client's log.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }

    /// A protocol error, with the reason it maps to and `what` it was about.
    pub fn proto(what: &str, e: &ProtoError) -> Self {
        Self::new(e.reject_reason(), format!("{what}: {e}"))
    }
}

/// The round's limits on one update (from `[rounds]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// The announced chunk size: every chunk but the last is exactly this long.
    pub chunk_size: u32,
    pub max_update_bytes: u64,
    /// Bound on ‖Δ‖₂; 0 disables it.
    pub max_update_norm: f64,
    /// Largest aggregation weight (`examples`) an update may claim.
    pub max_examples: u64,
    pub accepted_codecs: Vec<Codec>,
}

impl Limits {
    /// The most chunks an update within `max_update_bytes` can take.
    pub fn max_chunks(&self) -> u64 {
        self.max_update_bytes
            .div_ceil(u64::from(self.chunk_size.max(1)))
            .max(1)
    }
}

/// What verification learnt about an accepted update.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub codec: Codec,
    /// ‖Δ‖₂ of the decoded delta, measured here (not the client's claim).
    pub norm: f64,
}

impl Verified {
    /// What the round state keeps of the accepted update `m`.
    pub fn record(&self, m: &UpdateManifest, dataset: Option<String>) -> UpdateRecord {
        let c = &m.metrics;
        let metrics = [
            ("loss", c.loss),
            ("fedprox_loss", c.fedprox_loss),
            ("grad_norm", c.grad_norm),
            ("update_norm", self.norm),
            ("steps", c.steps as f64),
            ("seconds", c.seconds),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        UpdateRecord {
            examples: m.examples,
            sha256: m.sha256.clone(),
            codec: m.codec.clone(),
            bytes: m.total_len,
            norm: self.norm,
            metrics,
            dataset,
        }
    }
}

/// The manifest's own fields against the round's limits: codec accepted, examples positive,
/// size cap, a self-consistent chunk layout in the announced chunk size, one hash per chunk.
/// Returns the tracker
/// for its chunks.
pub fn check_manifest(m: &UpdateManifest, limits: &Limits) -> Result<ChunkTracker, Rejection> {
    let accepted = m
        .codec
        .parse::<Codec>()
        .is_ok_and(|c| limits.accepted_codecs.contains(&c));
    if !accepted {
        return Err(Rejection::new(
            RejectReason::UnsupportedCodec,
            format!("codec {} is not accepted this round", m.codec),
        ));
    }
    if m.examples == 0 {
        return Err(Rejection::new(
            RejectReason::MalformedMessage,
            "examples must be positive",
        ));
    }
    check_weight(m, limits, None)?;
    if m.total_len > limits.max_update_bytes {
        return Err(Rejection::new(
            RejectReason::Oversize,
            format!(
                "update of {} bytes exceeds max_update_bytes {}",
                m.total_len, limits.max_update_bytes
            ),
        ));
    }
    let tracker = ChunkTracker::new(
        m.total_len,
        m.chunk_count,
        m.chunk_size,
        limits.max_update_bytes,
    )
    .map_err(|e| Rejection::proto("manifest", &e))?;
    if m.chunk_size != limits.chunk_size {
        return Err(Rejection::new(
            RejectReason::MalformedMessage,
            format!(
                "chunk size {} differs from the announced {}",
                m.chunk_size, limits.chunk_size
            ),
        ));
    }
    if !m.chunk_hashes_complete() {
        return Err(Rejection::new(
            RejectReason::MalformedMessage,
            format!(
                "{} bytes of chunk hashes for {} chunks (32 each)",
                m.chunk_sha256.len(),
                m.chunk_count
            ),
        ));
    }
    Ok(tracker)
}

/// The aggregation weight a client claims (`examples`) against what the aggregator allows:
/// `max_examples`, and the dataset size the client reported in its status (`reported`, when it
/// reported one). Refused, not capped: a capped weight would still count an update whose claim
/// is false. The intake checks the configured maximum before any chunk; the event loop, which
/// holds the client statuses, checks both once the blob is verified.
pub fn check_weight(
    m: &UpdateManifest,
    limits: &Limits,
    reported: Option<u64>,
) -> Result<(), Rejection> {
    if m.examples > limits.max_examples {
        return Err(Rejection::new(
            RejectReason::WeightBound,
            format!(
                "examples {} exceeds max_examples {}",
                m.examples, limits.max_examples
            ),
        ));
    }
    match reported.filter(|&n| n > 0) {
        Some(n) if m.examples > n => Err(Rejection::new(
            RejectReason::WeightBound,
            format!(
                "examples {} exceeds the dataset size {n} the client reported",
                m.examples
            ),
        )),
        _ => Ok(()),
    }
}

/// The whole blob against its manifest (which passed [`check_manifest`]) and the model spec.
/// Decodes one tensor at a time and keeps only the norm: no whole f32 delta in memory.
pub fn verify_update(
    m: &UpdateManifest,
    blob: &[u8],
    spec: &ModelSpec,
    limits: &Limits,
) -> Result<Verified, Rejection> {
    if blob.len() as u64 != m.total_len {
        return Err(Rejection::new(
            RejectReason::MalformedMessage,
            format!(
                "blob is {} bytes, manifest says {}",
                blob.len(),
                m.total_len
            ),
        ));
    }
    // Compared as bytes: the manifest may spell its hex in either case.
    let expected = parse_sha256_hex(&m.sha256).map_err(|e| Rejection::proto("manifest", &e))?;
    let actual = sha256(blob);
    if actual != expected {
        return Err(Rejection::new(
            RejectReason::HashMismatch,
            format!(
                "SHA-256 {} != manifest {}",
                shared_proto::hash::sha256_hex(blob),
                m.sha256
            ),
        ));
    }
    let max_decoded = spec.f32_bytes().saturating_add(1 << 20);
    let mut norm_sq = 0.0f64;
    let codec = decode_delta_each(blob, spec, max_decoded, |_, _, values| {
        norm_sq += values
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>();
        Ok::<_, ProtoError>(())
    })
    .map_err(|e| Rejection::proto("delta", &e))?;
    // The blob's own codec must be the one the signed manifest declares (which
    // `check_manifest` found accepted), so a client cannot slip another encoding in.
    if m.codec.parse::<Codec>().ok() != Some(codec) {
        return Err(Rejection::new(
            RejectReason::UnsupportedCodec,
            format!(
                "blob is encoded with {codec} but the manifest declares {}",
                m.codec
            ),
        ));
    }
    let norm = norm_sq.sqrt();
    let bound = limits.max_update_norm;
    if bound > 0.0 && norm > bound {
        return Err(Rejection::new(
            RejectReason::NormBound,
            format!("‖Δ‖₂ = {norm:.6} exceeds the bound {bound}"),
        ));
    }
    Ok(Verified { codec, norm })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::message::ClientMetrics;

    fn manifest(examples: u64) -> UpdateManifest {
        UpdateManifest {
            v: shared_proto::PROTOCOL_VERSION,
            federation: "lab".into(),
            client_id: "robot-1".into(),
            round: 1,
            base_model_id: Default::default(),
            codec: "f32".into(),
            total_len: 10,
            chunk_count: 1,
            chunk_size: 1024,
            sha256: Default::default(),
            examples,
            metrics: ClientMetrics {
                loss: 0.0,
                fedprox_loss: 0.0,
                grad_norm: 0.0,
                update_norm: 0.0,
                steps: 1,
                seconds: 0.0,
            },
            chunk_sha256: vec![0; 32],
            signature: Vec::new(),
        }
    }

    fn limits() -> Limits {
        Limits {
            chunk_size: 1024,
            max_update_bytes: 1 << 20,
            max_update_norm: 0.0,
            max_examples: 10_000_000,
            accepted_codecs: vec![Codec::F32],
        }
    }

    #[test]
    fn weight_over_the_maximum_or_the_reported_dataset_is_refused() {
        let l = limits();
        let refused = |m: &UpdateManifest, reported| check_weight(m, &l, reported).unwrap_err();
        assert_eq!(
            refused(&manifest(1_000_000_000_000), None).reason,
            RejectReason::WeightBound
        );
        // The manifest check refuses it before any chunk is stored.
        let r = check_manifest(&manifest(1_000_000_000_000), &l).unwrap_err();
        assert_eq!(r.reason, RejectReason::WeightBound);
        check_manifest(&manifest(10_000_000), &l).unwrap();
        // Within the maximum but more than the client's own dataset holds.
        let r = refused(&manifest(5_000), Some(4_999));
        assert_eq!(r.reason, RejectReason::WeightBound);
        assert!(r.detail.contains("4999"), "{}", r.detail);
        check_weight(&manifest(4_999), &l, Some(4_999)).unwrap();
        // No size reported (0 or absent): only the maximum applies.
        check_weight(&manifest(5_000), &l, Some(0)).unwrap();
        check_weight(&manifest(5_000), &l, None).unwrap();
    }
}
