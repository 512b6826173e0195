//! Control messages: client statuses (signed by the enrolled key, fresh) and the aggregator's
//! own retained topics, restored when someone else overwrites them.

use super::*;

impl Server {
    /// A client's retained status: signed by its enrolled key, for this federation, and not
    /// older than the last one seen; anything else is dropped and counted.
    pub(super) async fn on_client_status(&mut self, cid: &str, payload: &[u8]) -> Result<()> {
        if payload.is_empty() {
            return Ok(()); // a cleared retained topic
        }
        self.refresh_keys()?;
        let status = match self.check_status(cid, payload) {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(client = cid, why, "client status dropped");
                self.metrics.status_refused(why);
                return Ok(());
            }
        };
        if !status.dataset.is_empty() {
            self.reported_datasets
                .insert(cid.to_string(), status.dataset.clone());
        }
        if status.examples > 0 {
            self.reported_examples
                .insert(cid.to_string(), status.examples);
        }
        let online = status.online;
        let changed = if online {
            self.online.insert(cid.to_string())
        } else {
            self.online.remove(cid)
        };
        if changed {
            tracing::info!(client = cid, online, "client status");
            self.metrics.connected_clients.set(self.online.len() as i64);
            let cfg = self.cfg.round_config();
            if online && self.state.join_late(&cfg, cid) == Some(Transition::Reannounce) {
                self.store.save_state(&self.state)?;
                self.announce().await;
            }
        }
        Ok(())
    }

    /// The status if it is authentic and fresh, else the reason it is not (a metric label).
    fn check_status(&mut self, cid: &str, payload: &[u8]) -> Result<ClientStatus, &'static str> {
        let s =
            message::decode::<ClientStatus>(payload, MAX_MESSAGE_BYTES).map_err(|_| "malformed")?;
        if s.client_id != cid || s.federation != self.cfg.federation {
            return Err("wrong_topic");
        }
        let key = self.keys.get(cid).map_err(|_| "unknown_key")?;
        s.verify_with(key).map_err(|_| "bad_signature")?;
        let fresh = Freshness::status(s.session, s.online);
        if self.statuses.get(cid).is_some_and(|f| !f.admits(fresh)) {
            return Err("stale");
        }
        if self.statuses.insert(cid.to_string(), fresh) != Some(fresh) {
            // Kept across restarts, so a replay is as stale after one as before.
            if let Err(e) = self.store.save_statuses(&self.statuses) {
                tracing::warn!(error = format!("{e:#}"), "saving client statuses");
            }
        }
        Ok(s)
    }

    /// A publish on the current model's retained topics that is not ours (another login's, on
    /// a broker without ACLs): ours goes back, a chunk sliced from the mapped model file. Our
    /// own publishes come back here too and match.
    pub(super) async fn guard_model(
        &mut self,
        id: &str,
        index: Option<u32>,
        arrived: &[u8],
    ) -> Result<()> {
        let Some((m, ours)) = self
            .model_manifest
            .as_ref()
            .filter(|(m, _)| m.model_id == id)
        else {
            return Ok(());
        };
        let Some(i) = index else {
            let (topic, ours) = (self.topics.model_manifest(id), ours.clone());
            if let Some(o) = self.overwritten(topic, Some(ours), arrived) {
                self.send_model(o).await;
            }
            return Ok(());
        };
        let Some(want) = m.chunk_hash(i) else {
            return Ok(()); // past the count: no agent asks for it
        };
        if shared_proto::hash::sha256(arrived)[..] == *want {
            return Ok(());
        }
        let file = self
            .model_file
            .as_ref()
            .context("the published model's file is not mapped")?;
        let all = file.bytes();
        let start = (u64::from(i) * u64::from(m.chunk_size)).min(all.len() as u64) as usize;
        let end = start.saturating_add(m.chunk_size as usize).min(all.len());
        let chunk = all.slice(start..end);
        if let Some(o) = self.overwritten(self.topics.model_chunk(id, i), Some(chunk), arrived) {
            self.send_model(o).await;
        }
        Ok(())
    }

    /// Publishes `ours` again on the retained `topic` if what arrived there is something else
    /// (agents drop a forgery, but one connecting later would see only that).
    pub(super) async fn restore(&mut self, topic: String, ours: Option<Bytes>, arrived: &[u8]) {
        if let Some(o) = self.overwritten(topic, ours, arrived) {
            self.send(o).await;
        }
    }

    /// The retained publish that puts `ours` back on `topic`, if what arrived differs; logged
    /// and counted.
    fn overwritten(&self, topic: String, ours: Option<Bytes>, arrived: &[u8]) -> Option<Outgoing> {
        let ours = ours.filter(|o| o[..] != *arrived)?;
        tracing::warn!(%topic, "retained message overwritten by another publisher; restored");
        self.metrics.retained_restored.inc();
        Some(Outgoing::new(topic, ours, true))
    }
}
