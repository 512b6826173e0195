//! Updates on the event loop: a chunk or manifest goes through the pure intake
//! ([`crate::intake`]) and its verdict is carried out here (spool, ask for chunks, verify on a
//! blocking thread, ack); a verified blob is accepted into the round or rejected.

use anyhow::Result;
use bytes::Bytes;
use shared_proto::message::{Ack, UpdateManifest};
use shared_proto::Sha256Hex;
use zk0_daemon::now_ms;

use super::{Job, Server};
use crate::intake::{Answer, ChunkVerdict, ManifestVerdict, Stored};
use crate::publish;
use crate::spool;
use crate::verify::{check_weight, verify_update, Rejection, Verified};

impl Server {
    pub(super) async fn on_chunk(
        &mut self,
        cid: &str,
        round: u64,
        index: u32,
        payload: Bytes,
    ) -> Result<()> {
        self.metrics.update_bytes.inc_by(payload.len() as u64);
        let gate = gate!(self);
        match self.uploads.on_chunk(gate, cid, round, index, &payload) {
            ChunkVerdict::Spool { offset } => {
                spool::write_chunk(&self.store, round, cid, index, offset, &payload)?;
                self.metrics
                    .update_bytes_spooled
                    .inc_by(payload.len() as u64);
                if let Stored::ReadyToVerify(m) = self.uploads.stored(cid, round, index) {
                    self.start_verify(*m);
                }
            }
            ChunkVerdict::Ignore(why) => {
                if why == crate::intake::Ignored::Forged {
                    tracing::warn!(
                        client = cid,
                        round,
                        index,
                        "chunk not matching its signed hash dropped"
                    );
                }
                self.metrics.chunk_refused(why.as_str());
            }
        }
        Ok(())
    }

    pub(super) async fn on_manifest(
        &mut self,
        cid: &str,
        round: u64,
        payload: &[u8],
    ) -> Result<()> {
        self.refresh_keys()?;
        let gate = gate!(self);
        let answer = self.uploads.on_manifest(gate, cid, round, payload);
        if let ManifestVerdict::AskMissing(_) | ManifestVerdict::Replace(_) = answer.verdict {
            if matches!(answer.verdict, ManifestVerdict::Replace(_)) {
                spool::discard(&self.store, round, cid);
            }
            // Kept beside the chunks, so a restart resumes the upload.
            spool::write_manifest(&self.store, round, cid, payload)?;
        }
        self.carry_out(cid, round, answer).await;
        Ok(())
    }

    /// Executes a manifest's verdict.
    pub(super) async fn carry_out(&mut self, cid: &str, round: u64, answer: Answer) {
        let Answer { sha256, verdict } = answer;
        match verdict {
            ManifestVerdict::Reack => self.answer(&sha256, Ack::accepted(cid, round)).await,
            ManifestVerdict::Reject(r) => self.reject(cid, round, &sha256, r).await,
            ManifestVerdict::AskMissing(missing) | ManifestVerdict::Replace(missing) => {
                tracing::debug!(
                    client = cid,
                    round,
                    chunks = missing.len(),
                    "asking for chunks"
                );
                self.metrics.chunks_requested.inc_by(missing.len() as u64);
                self.answer(&sha256, Ack::incomplete(cid, round, missing))
                    .await;
            }
            ManifestVerdict::ReadyToVerify(m) => self.start_verify(*m),
            ManifestVerdict::Verifying => {}
        }
    }

    /// Reads and verifies the upload's blob on a blocking thread; the verdict comes back as
    /// [`Job::Verified`].
    pub(super) fn start_verify(&self, manifest: UpdateManifest) {
        let (store, spec, limits, jobs, metrics) = (
            self.store.clone(),
            self.spec.clone(),
            self.limits.clone(),
            self.jobs.clone(),
            self.metrics.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let (cid, round) = (manifest.client_id.clone(), manifest.round);
            let result = spool::read_blob(&store, round, &cid, manifest.total_len)
                .inspect(|blob| {
                    metrics.update_bytes_read_back.inc_by(blob.len() as u64);
                })
                .map_err(|e| Rejection::new(shared_proto::RejectReason::Internal, format!("{e:#}")))
                .and_then(|blob| verify_update(&manifest, &blob, &spec, &limits));
            let _ = jobs.blocking_send(Job::Verified {
                cid,
                round,
                manifest,
                result,
            });
        });
    }

    /// A blob's verdict from [`Server::start_verify`]: accepted only if its round still
    /// admits it and the weight it claims is within what the client reported.
    pub(super) async fn on_verified(
        &mut self,
        cid: String,
        round: u64,
        manifest: UpdateManifest,
        result: std::result::Result<Verified, Rejection>,
    ) -> Result<()> {
        // The round may have closed while the blob was being verified.
        let result = result.and_then(|v| match self.state.admit(&cid, round) {
            Ok(()) => Ok(v),
            Err(_) => Err(Rejection::new(
                shared_proto::RejectReason::LateOrOldRound,
                format!("round {round} closed while the update was verified"),
            )),
        });
        // No more examples than the dataset the client reported (the loop holds that).
        let reported = self.reported_examples.get(&cid).copied();
        let result =
            result.and_then(|v| check_weight(&manifest, &self.limits, reported).map(|()| v));
        match result {
            Ok(v) => self.accept(&cid, round, &manifest, &v).await,
            Err(r) => {
                self.uploads.refused(&cid, round);
                spool::discard(&self.store, round, &cid);
                self.reject(&cid, round, &manifest.sha256, r).await;
                Ok(())
            }
        }
    }

    pub(super) async fn accept(
        &mut self,
        cid: &str,
        round: u64,
        m: &UpdateManifest,
        v: &Verified,
    ) -> Result<()> {
        spool::accept(&self.store, round, cid, m.total_len)?;
        let configured = self.cfg.datasets.for_client(cid).map(|d| d.repo_id.clone());
        let dataset = configured.or_else(|| self.reported_datasets.get(cid).cloned());
        self.state.record(cid, v.record(m, dataset));
        self.store.save_state(&self.state)?;
        self.uploads.accepted(cid);
        self.metrics.updates_accepted.inc();
        tracing::info!(client = cid, round, examples = m.examples, bytes = m.total_len, codec = %m.codec, "update accepted");
        self.answer(&m.sha256, Ack::accepted(cid, round)).await;
        Ok(())
    }

    pub(super) async fn reject(&mut self, cid: &str, round: u64, sha256: &Sha256Hex, r: Rejection) {
        tracing::warn!(client = cid, round, reason = r.reason.as_str(), detail = %r.detail, "update rejected");
        self.metrics.reject(r.reason.as_str());
        self.answer(sha256, Ack::rejected(cid, round, r.reason, r.detail))
            .await;
    }

    /// Seals `ack` (federation, the blob it answers, a sequence number, signature) and sends it.
    pub(super) async fn answer(&mut self, sha256: &Sha256Hex, ack: Ack) {
        let seq = self.seq.next(now_ms());
        let ack = ack.seal(&self.cfg.federation, sha256, seq, &self.signer);
        self.send(publish::ack(&self.topics, &ack)).await;
    }
}
