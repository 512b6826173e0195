//! Starting the daemon: state, broker, MQTT connection, keys, resumed uploads.

use super::*;
use crate::intake::ManifestVerdict;

impl Server {
    /// Loads the state, starts (or finds) the broker, connects, evaluates the initial model.
    pub(super) async fn start(
        cfg: Config,
        store: Store,
        jobs: mpsc::Sender<Job>,
    ) -> Result<(Server, mqtt::Inbox)> {
        let state = store.load_state()?.with_context(|| {
            format!(
                "no federation in {} (run `zk0-aggregator init --model …`)",
                store.dir.display()
            )
        })?;
        let signer = zk0_daemon::keys::load_keypair(store.key_path())?;
        let metrics = Metrics::new();
        serve_metrics(&cfg, &metrics).await?;
        let topics = Topics::new(&cfg.federation).context("federation name")?;
        let (client, inbox, model_link) = connect(&cfg, &topics, &state, &signer, &metrics)?;

        let global = aggregate::load_model(&store, &state.model_id)?;
        let mut cfg = cfg;
        cfg.outputs.resolve_eval_dataset(&cfg.datasets);
        let base_dir = base_checkpoint(&cfg);
        let finished = matches!(state.phase, Phase::Finished);
        // A damaged file costs only the replay floor, not the start.
        let statuses = store.load_statuses().unwrap_or_else(|e| {
            tracing::warn!(
                error = format!("{e:#}"),
                "client statuses not loaded; starting without"
            );
            BTreeMap::new()
        });
        let mut srv = Server {
            limits: cfg.limits(),
            cfg: Arc::new(cfg),
            spec: Arc::new(ModelSpec::from_tensors(&global)),
            store,
            state,
            signer,
            metrics,
            topics,
            client,
            jobs,
            online: BTreeSet::new(),
            statuses,
            seq: Sequence::default(),
            session: 0,
            announced: None,
            status_sent: None,
            reported_datasets: BTreeMap::new(),
            reported_examples: BTreeMap::new(),
            uploads: UploadTable::default(),
            keys: Keys::default(),
            keys_mtime: None,
            published: None,
            model_file: None,
            model_link,
            model_manifest: None,
            base_dir,
            closing: None,
            outputs: None,
            done: finished,
        };
        drop(global);
        srv.metrics.current_round.set(srv.state.round as i64);
        srv.refresh_keys()?;
        srv.remove_closed_rounds();
        srv.resume_outputs()?;
        srv.resume_uploads().await;
        srv.initial_eval().await;
        tracing::info!(round = srv.state.round, model = %srv.state.model_id, phase = ?srv.state.phase, "aggregator started");
        Ok((srv, inbox))
    }

    /// Writes again the outputs of completed rounds a crash left pending (in the background,
    /// oldest first, like the outputs of a round closed now).
    fn resume_outputs(&mut self) -> Result<()> {
        let pending = close::Pending::new(&self.store).completed(&self.state)?;
        if pending.is_empty() {
            return Ok(());
        }
        let rounds: Vec<u64> = pending.iter().map(|o| o.summary.round).collect();
        tracing::warn!(?rounds, "writing the outputs a crash interrupted");
        // Each model is read on the blocking thread, one at a time, not here at start-up.
        let (cfg, store, base_dir) = (self.cfg.clone(), self.store.clone(), self.base_dir.clone());
        self.outputs = Some(tokio::task::spawn_blocking(move || {
            for o in pending {
                let round = o.summary.round;
                match close::Outputs::resume(cfg.clone(), store.clone(), base_dir.clone(), o) {
                    Ok(job) => job.run(),
                    Err(e) => tracing::error!(
                        round,
                        error = format!("{e:#}"),
                        "run outputs not written (tried again at the next start)"
                    ),
                }
            }
        }));
        Ok(())
    }

    /// Spool, accepted and scratch files of rounds already completed (a crash came before
    /// their removal).
    fn remove_closed_rounds(&self) {
        for r in 1..self.state.round {
            for d in [
                self.store.spool_round_dir(r),
                self.store.accepted_round_dir(r),
                self.store.scratch_round_dir(r),
            ] {
                if d.exists() {
                    let _ = std::fs::remove_dir_all(&d);
                }
            }
        }
    }

    /// Takes up the uploads spooled before a restart: their signed manifests are checked
    /// again and their stored chunks counted; one already complete is verified now.
    async fn resume_uploads(&mut self) {
        let round = self.state.round;
        for (cid, up) in spool::stored(&self.store, round) {
            if self.state.accepted.contains_key(&cid) {
                continue;
            }
            let gate = gate!(self);
            let answer =
                self.uploads
                    .resume(gate, &cid, round, &up.manifest, up.chunks.into_keys());
            match answer.verdict {
                // The client resends its manifest when no ack comes; it is asked then.
                ManifestVerdict::AskMissing(_) => {}
                ManifestVerdict::ReadyToVerify(m) => self.start_verify(*m),
                _ => spool::discard(&self.store, round, &cid),
            }
        }
    }

    /// Round 0 of the policy-loss history: the initial model, evaluated once.
    pub(super) async fn initial_eval(&self) {
        if self.state.round != 1 || !self.state.history.is_empty() {
            return;
        }
        let id = self.state.model_id.clone();
        let have = OutputFiles::new(&self.store)
            .load_history()
            .is_ok_and(|h| h.points.iter().any(|p| p.round == 0 && p.model_id == id));
        if !have {
            if let Some(Err(e)) = close::server_eval(&self.close_job(), 0, &id).await {
                tracing::warn!(error = %e, "initial-model evaluation failed");
            }
        }
    }

    pub(super) fn close_job(&self) -> CloseJob {
        CloseJob {
            cfg: self.cfg.clone(),
            store: self.store.clone(),
            spec: self.spec.clone(),
            metrics: self.metrics.clone(),
            base_dir: self.base_dir.clone(),
            round: self.state.round,
            model_id: self.state.model_id.clone().into(),
            accepted: self.state.accepted.clone(),
        }
    }

    /// Re-reads `keys.json` if it changed since the last look.
    pub(super) fn refresh_keys(&mut self) -> Result<()> {
        let mtime = std::fs::metadata(self.store.keys_path())
            .and_then(|m| m.modified())
            .ok();
        if mtime != self.keys_mtime || mtime.is_none() {
            self.keys = Keys::from_registry(&self.store.load_keys()?);
            self.keys_mtime = mtime;
            self.drop_revoked()?;
        }
        Ok(())
    }

    /// Clients whose key was revoked are offline from now on, and the collecting round stops
    /// waiting for them; their messages fail the key check from here on.
    fn drop_revoked(&mut self) -> Result<()> {
        let revoked: Vec<String> = (self.online.iter())
            .chain(self.state.selected.iter())
            .filter(|c| !self.keys.is_enrolled(c))
            .cloned()
            .collect();
        let mut changed = false;
        for cid in revoked {
            if self.online.remove(&cid) {
                tracing::warn!(client = %cid, "key revoked: client dropped");
            }
            self.statuses.remove(&cid);
            changed |= self.state.withdraw(&cid);
        }
        self.metrics.connected_clients.set(self.online.len() as i64);
        if changed {
            self.store.save_state(&self.state)?;
        }
        Ok(())
    }
}

/// Serves Prometheus `/metrics` on `[metrics] listen`, if set.
async fn serve_metrics(cfg: &Config, metrics: &Arc<Metrics>) -> Result<()> {
    if cfg.metrics.listen.is_empty() {
        return Ok(());
    }
    let l = tokio::net::TcpListener::bind(&cfg.metrics.listen)
        .await
        .with_context(|| format!("metrics listener on {}", cfg.metrics.listen))?;
    tracing::info!(addr = %l.local_addr()?, "serving Prometheus /metrics");
    tokio::spawn(metrics::serve(l, metrics.clone()));
    Ok(())
}

/// Starts (or finds) the broker and connects to it: TLS and login as configured, each
/// session's signed offline status as its will, update chunks shed (and counted) when the
/// inbox is full. Returns the client, its inbox and the embedded broker's model link.
fn connect(
    cfg: &Config,
    topics: &Topics,
    state: &RoundState,
    signer: &KeyPair,
    metrics: &Arc<Metrics>,
) -> Result<(AsyncClient, mqtt::Inbox, Option<ModelLink>)> {
    let broker = crate::broker::start_or_connect(cfg, metrics)?;
    let mut settings = mqtt::Settings::new(mqtt::aggregator_client_id(&cfg.federation), broker.url);
    settings.ca_file = cfg.broker.tls_ca.clone().into();
    if !cfg.broker.tls_client_cert.is_empty() {
        let b = &cfg.broker;
        settings.client_cert = Some((
            b.tls_client_cert.clone().into(),
            b.tls_client_key.clone().into(),
        ));
    }
    settings.credentials = broker.login;
    settings.max_packet_bytes = cfg.broker.max_packet_bytes;
    settings.request_capacity = 4096;
    // Each connection's will: the offline status of that session, signed.
    let (will_topics, will_state, will_signer) = (topics.clone(), state.clone(), signer.clone());
    settings.last_will = Some(mqtt::WillFn::new(move |session| {
        let o = publish::status(
            &will_topics,
            &will_state,
            &will_signer,
            session,
            false,
            now_ms(),
        );
        LastWill::new(o.topic, o.payload, QoS::AtLeastOnce, true)
    }));
    // Update chunks are what a flood is made of, and what a client resends when asked:
    // shed those when the inbox is full, never control messages.
    let parser = topics.clone();
    let m = metrics.clone();
    let shedding =
        Shedding::when(move |t| matches!(parser.parse(t), Some(TopicKind::UpdateChunk { .. })))
            .on_shed(move |_, len| {
                m.chunks_shed.inc();
                m.chunk_bytes_shed.inc_by(len as u64);
            });
    let (client, inbox) = mqtt::connect(settings, shedding)?;
    Ok((client, inbox, broker.model_link))
}

/// The base LeRobot checkpoint the global tensors apply to (`[outputs] base_model_dir`, else
/// `[rounds] base_model`), if it can be found: without it there is no server evaluation and
/// checkpoints hold only the training state.
fn base_checkpoint(cfg: &Config) -> Option<PathBuf> {
    let name = if cfg.outputs.base_model_dir.is_empty() {
        &cfg.rounds.base_model
    } else {
        &cfg.outputs.base_model_dir
    };
    match checkpoint::resolve(name) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "no base checkpoint: no server evaluation, checkpoints hold only the training state");
            None
        }
    }
}
