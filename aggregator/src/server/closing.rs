//! Carrying out a round close and publishing: the close job, its completion, outputs, and
//! every publish the loop makes.

use super::*;

impl Server {
    pub(super) fn start_close(&mut self, reason: Option<CloseReason>) {
        self.closing = Some(reason);
        let (job, jobs) = (self.close_job(), self.jobs.clone());
        tokio::spawn(async move {
            let _ = jobs.send(Job::Closed(job.run().await)).await;
        });
    }

    /// The new model is saved (and evaluated): complete the round, publish, write outputs.
    pub(super) async fn on_closed(
        &mut self,
        closed: Closed,
        reason: Option<CloseReason>,
    ) -> Result<()> {
        let round = self.state.round;
        let accepted = self.state.accepted.clone();
        let reason = reason.unwrap_or(if self.state.dropped().is_empty() {
            CloseReason::AllReported
        } else {
            CloseReason::Deadline
        });
        let server_loss = closed
            .server_eval
            .as_ref()
            .and_then(|r| r.as_ref().ok())
            .map(|e| e.policy_loss);
        close::observe_schedule(
            &mut self.state,
            &self.cfg,
            round,
            server_loss,
            &closed.excluded,
        );
        for e in &closed.excluded {
            self.metrics.exclude(e.reason.as_str());
        }
        let summary =
            self.state
                .complete(closed.model_id.clone(), reason, closed.excluded, now_ms());
        let outputs = close::RoundOutputs {
            state: self.state.clone(),
            summary: summary.clone(),
            accepted,
            server_eval: closed.server_eval,
        };
        // Outputs first, completion second: a crash between them redoes the close.
        close::Pending::new(&self.store).save(&outputs)?;
        zk0_daemon::crash_point::hold_async("complete", round).await;
        self.store.save_state(&self.state)?;
        let _ = std::fs::remove_dir_all(self.store.spool_round_dir(round));
        let _ = std::fs::remove_dir_all(self.store.accepted_round_dir(round));
        self.metrics.rounds_completed.inc();
        self.metrics
            .round_duration_seconds
            .observe(summary.duration_ms as f64 / 1000.0);
        tracing::info!(round, model = %closed.model_id, accepted = ?summary.accepted, dropped = ?summary.dropped, excluded = summary.excluded.len(), metrics = ?summary.metrics, "round aggregated");
        self.publish_model().await?;
        self.publish_status(true).await;
        let job = close::Outputs {
            cfg: self.cfg.clone(),
            store: self.store.clone(),
            base_dir: self.base_dir.clone(),
            round: outputs,
        };
        self.finish_outputs().await;
        self.outputs = Some(tokio::task::spawn_blocking(move || job.run()));
        Ok(())
    }

    pub(super) async fn finish_outputs(&mut self) {
        if let Some(h) = self.outputs.take() {
            let _ = h.await;
        }
    }

    pub(super) async fn stop(&mut self) {
        self.finish_outputs().await;
        self.publish_status(false).await;
    }

    /// Publishes the collecting round's announcement, signed with a fresh sequence number.
    pub(super) async fn announce(&mut self) {
        let seq = self.seq.next(now_ms());
        if let Some(o) =
            publish::announcement(&self.topics, &self.state, &self.cfg, seq, &self.signer)
        {
            self.announced = Some(o.payload.clone());
            self.send(o).await;
        }
    }

    /// Publishes the current global model, served from its file in the state dir, and clears
    /// the previous model's retained messages.
    pub(super) async fn publish_model(&mut self) -> Result<()> {
        let id = self.state.model_id.clone();
        if self.published.as_ref().is_some_and(|(p, _)| *p == id) {
            return Ok(());
        }
        let path = self.store.model_path(&id);
        let file = ModelFile::open(&path).with_context(|| format!("mapping {}", path.display()))?;
        let bytes = file.bytes().clone();
        if let Some((old, count)) = self.published.take().or_else(|| self.previous_published()) {
            if old != id {
                for o in publish::clear_model(&self.topics, &old, count) {
                    self.send_model(o).await;
                }
            }
        }
        let chunk_size = self.cfg.rounds.chunk_size;
        let msgs = publish::model(
            &self.topics,
            &id,
            self.state.round,
            &bytes,
            &self.spec,
            chunk_size,
            &self.signer,
        );
        // Hashing the chunks for the manifest read the whole file: let those pages go.
        file.trim();
        if let Some(old) = self.model_file.replace(file) {
            old.trim();
        }
        let count = msgs.len() as u32 - 1;
        let manifest = msgs.last().map(|o| o.payload.clone()).unwrap_or_default();
        for o in msgs {
            self.send_model(o).await;
        }
        // Watch the model's topics: what anyone else publishes there is put back (a broker
        // without ACLs lets any login overwrite a retained chunk).
        if let Some((old, _)) = self.model_manifest.take() {
            let _ = self
                .client
                .unsubscribe(self.topics.model_filter(&old.model_id))
                .await;
        }
        self.model_manifest = message::decode(&manifest, usize::MAX)
            .ok()
            .map(|m| (m, manifest));
        self.client
            .subscribe(self.topics.model_filter(&id), QoS::AtLeastOnce)
            .await?;
        self.metrics
            .model_bytes_published
            .inc_by(bytes.len() as u64);
        tracing::info!(model = %id, bytes = bytes.len(), chunks = count, "global model published");
        self.published = Some((id.into(), count));
        Ok(())
    }

    /// The model of the previous round, whose retained messages may still be on the broker.
    pub(super) fn previous_published(&self) -> Option<(String, u32)> {
        let prev = self.state.history.last()?.base_model_id.clone();
        let len = std::fs::metadata(self.store.model_path(&prev)).ok()?.len();
        let count = len.div_ceil(self.cfg.rounds.chunk_size as u64).max(1);
        Some((prev.into(), count as u32))
    }

    pub(super) async fn publish_status(&mut self, online: bool) {
        let o = publish::status(
            &self.topics,
            &self.state,
            &self.signer,
            self.session,
            online,
            now_ms(),
        );
        self.status_sent = Some(o.payload.clone());
        self.send(o).await;
    }

    pub(super) async fn send(&self, o: Outgoing) {
        mqtt::publish_logged(&self.client, o.topic, o.payload, o.retain).await;
    }

    /// Sends a message of the global model's topics: through the embedded broker's link when
    /// there is one (the broker keeps the payload as is), else like any other.
    pub(super) async fn send_model(&mut self, o: Outgoing) {
        match &mut self.model_link {
            Some(link) => {
                if let Err(e) = link.publish(o.topic.clone(), o.payload, o.retain).await {
                    tracing::warn!(topic = %o.topic, error = format!("{e:#}"), "publish failed");
                }
            }
            None => self.send(o).await,
        }
    }

    /// Lets go of the published model's pages this process touched since the last tick (the
    /// broker sending chunks to agents); they stay in the page cache.
    pub(super) fn trim_model(&self) {
        if let Some(f) = &self.model_file {
            f.trim();
        }
    }
}
