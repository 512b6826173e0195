//! A whole federation on loopback for end-to-end tests: one `zk0-aggregator`, N `zk0-agent`
//! daemons running a training worker (the test-only `zk0-fake-worker`, or the real `zk0-train`
//! with [`Federation::datasets`] and [`Federation::agent_extra`]), and an observer MQTT client that records
//! every update and model blob so a test can recompute each round's weighted average itself.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc_ring::{Client, Event, MqttOptions, Packet, QoS};
use shared_proto::message::{self, ModelManifest, UpdateManifest};
use shared_proto::tensor::{read_safetensors, write_safetensors, ModelSpec, Tensor, TensorSet};
use shared_proto::topic::{TopicKind, Topics};

use crate::{bin, free_port, run_ok, ChildGuard};

/// Which broker the federation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// The aggregator's embedded rumqttd.
    Embedded,
    /// A mosquitto process started by the harness.
    Mosquitto,
}

/// Everything the observer saw, keyed for reassembly. Anyone may publish on a client's
/// topics, so every manifest and chunk seen is kept; [`Observed::update_blob`] picks the
/// manifest the aggregator accepted and the chunks matching its signed hashes.
#[derive(Debug, Default)]
pub struct Observed {
    /// (client, round) → chunk index → every payload seen there.
    pub update_chunks: HashMap<(String, u64), BTreeMap<u32, Vec<Vec<u8>>>>,
    /// (client, round) → every manifest seen, in arrival order.
    pub update_manifests: HashMap<(String, u64), Vec<UpdateManifest>>,
    /// (client, round) → the blob hash the aggregator's accepting ack names.
    pub accepted_sha256: HashMap<(String, u64), String>,
    /// Retained round announcements seen, in arrival order (raw CBOR).
    pub announcements: Vec<Vec<u8>>,
    /// When set, acks not signed by this key (forgeries a test sends) are not recorded.
    pub aggregator_key: Option<shared_proto::sign::PublicKey>,
    /// Every payload seen on each model chunk topic (an attacker may publish there too).
    pub model_chunks: HashMap<String, BTreeMap<u32, Vec<Vec<u8>>>>,
    pub model_manifests: HashMap<String, ModelManifest>,
    /// (client, round) → (accepted, reason)
    pub acks: HashMap<(String, u64), (bool, Option<String>)>,
    /// (client, round) → chunk indices the aggregator asked to be resent (not a verdict).
    pub missing: HashMap<(String, u64), Vec<u32>>,
}

impl Observed {
    /// The blob of an update and its manifest (the accepted one, else the last seen), if a
    /// chunk matching each of the manifest's hashes was seen.
    pub fn update_blob(&self, cid: &str, round: u64) -> Option<(Vec<u8>, UpdateManifest)> {
        let key = (cid.to_string(), round);
        let manifests = self.update_manifests.get(&key)?;
        let m = match self.accepted_sha256.get(&key) {
            Some(sha) => manifests.iter().rev().find(|m| m.sha256 == *sha)?,
            None => manifests.last()?,
        }
        .clone();
        let chunks = self.update_chunks.get(&key)?;
        let mut blob = Vec::new();
        for i in 0..m.chunk_count {
            let want = m.chunk_hash(i)?;
            let c = chunks
                .get(&i)?
                .iter()
                .find(|c| shared_proto::hash::sha256(c)[..] == *want)?;
            blob.extend_from_slice(c);
        }
        Some((blob, m))
    }

    /// The published bytes of a global model, if every chunk was seen (the one matching the
    /// manifest's hash for it).
    pub fn model_blob(&self, id: &str) -> Option<Vec<u8>> {
        let m = self.model_manifests.get(id)?;
        let chunks = self.model_chunks.get(id)?;
        let mut blob = Vec::new();
        for i in 0..m.chunk_count {
            let seen = chunks.get(&i)?;
            let c = match m.chunk_hash(i) {
                Some(want) => seen
                    .iter()
                    .find(|c| shared_proto::hash::sha256(c)[..] == *want)?,
                None => seen.last()?,
            };
            blob.extend_from_slice(c);
        }
        Some(blob)
    }
}

/// Observer MQTT client on its own thread; stops when dropped (bounded by the process).
pub struct Observer {
    pub seen: Arc<Mutex<Observed>>,
    client: Client,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl Observer {
    pub fn start(port: u16, federation: &str) -> Result<Observer> {
        Self::start_with(port, federation, None)
    }

    /// Like [`Observer::start`], logging in with `(username, password)`.
    pub fn start_with(
        port: u16,
        federation: &str,
        login: Option<(&str, &str)>,
    ) -> Result<Observer> {
        let topics = Topics::new(federation)?;
        // The embedded broker binds a login to one client id: the agent id of its name.
        let id = match login {
            Some((u, _)) => zk0_daemon::mqtt::agent_client_id(u),
            None => format!("zk0-test-observer-{}", std::process::id()),
        };
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        opts.set_max_packet_size(64 << 20, 64 << 20);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut conn) = Client::new(opts, 1024);
        let seen = Arc::new(Mutex::new(Observed::default()));
        let s2 = seen.clone();
        let sub = client.clone();
        let filter = format!("{}/#", topics.prefix());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.payload.is_empty() {
                            continue;
                        }
                        let Ok(mut o) = s2.lock() else { return };
                        record(&topics, &mut o, &p.topic, &p.payload);
                    }
                    Ok(_) => {}
                    Err(rumqttc_ring::ConnectionError::RequestsDone) => return,
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        Ok(Observer { seen, client })
    }

    /// Waits until the observer's subscription is in place (it sees the retained server status).
    pub fn wait_subscribed(&self, timeout: Duration) -> Result<()> {
        crate::wait_for(timeout, "observer subscription", || {
            let o = self.seen.lock().ok()?;
            (!o.model_manifests.is_empty()).then_some(())
        })
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

fn record(topics: &Topics, o: &mut Observed, topic: &str, payload: &[u8]) {
    let max = message::DEFAULT_MAX_MESSAGE_LEN;
    match topics.parse(topic) {
        Some(TopicKind::UpdateChunk {
            client_id,
            round,
            index,
        }) => {
            o.update_chunks
                .entry((client_id, round))
                .or_default()
                .entry(index)
                .or_default()
                .push(payload.to_vec());
        }
        Some(TopicKind::UpdateManifest { client_id, round }) => {
            if let Ok(m) = message::decode::<UpdateManifest>(payload, max) {
                o.update_manifests
                    .entry((client_id, round))
                    .or_default()
                    .push(m);
            }
        }
        Some(TopicKind::Round) => o.announcements.push(payload.to_vec()),
        Some(TopicKind::ModelChunk { model_id, index }) => {
            o.model_chunks
                .entry(model_id)
                .or_default()
                .entry(index)
                .or_default()
                .push(payload.to_vec());
        }
        Some(TopicKind::ModelManifest { model_id }) => {
            if let Ok(m) = message::decode::<ModelManifest>(payload, max) {
                if o.aggregator_key.is_some_and(|k| m.verify_with(&k).is_err()) {
                    return;
                }
                o.model_manifests.insert(model_id, m);
            }
        }
        Some(TopicKind::Ack { client_id, round }) => {
            if let Ok(a) = message::decode::<message::Ack>(payload, max) {
                if o.aggregator_key.is_some_and(|k| a.verify_with(&k).is_err()) {
                    return;
                }
                if a.is_incomplete() {
                    o.missing.insert((client_id, round), a.missing);
                    return;
                }
                if a.accepted {
                    o.accepted_sha256
                        .insert((client_id.clone(), round), a.update_sha256.clone().into());
                }
                o.acks.insert(
                    (client_id, round),
                    (a.accepted, a.reason.map(|r| r.as_str().to_string())),
                );
            }
        }
        _ => {}
    }
}

/// A test client's manifest for `blob` (encoded with `codec`, cut at `chunk_size`), unsigned:
/// what a hostile or hand-driven client sends, signed by whichever key the test picks.
#[allow(clippy::too_many_arguments)] // one per manifest field a test sets
pub fn update_manifest(
    federation: &str,
    cid: &str,
    round: u64,
    base: &str,
    codec: &str,
    blob: &[u8],
    chunk_size: u32,
    examples: u64,
) -> UpdateManifest {
    let mut m = UpdateManifest {
        v: message::PROTOCOL_VERSION,
        federation: federation.into(),
        client_id: cid.into(),
        round,
        base_model_id: base.into(),
        codec: codec.into(),
        total_len: 0,
        chunk_count: 0,
        chunk_size: 0,
        sha256: Default::default(),
        examples,
        metrics: message::ClientMetrics {
            loss: 1.0,
            fedprox_loss: 0.0,
            grad_norm: 1.0,
            update_norm: 1.0,
            steps: 1,
            seconds: 1.0,
        },
        chunk_sha256: Vec::new(),
        signature: Vec::new(),
    };
    m.describe_blob(blob, chunk_size);
    m
}

/// A small deterministic "trainable tensors" model (a few thousand parameters, several chunks
/// at the test chunk size).
pub fn tiny_model() -> TensorSet {
    let mk = |shape: Vec<usize>, k: f32| {
        let n: usize = shape.iter().product();
        Tensor {
            shape,
            data: (0..n).map(|i| ((i as f32) * 0.001 + k).sin()).collect(),
        }
    };
    let mut m = TensorSet::new();
    m.insert("action_expert.layer0.weight".into(), mk(vec![48, 64], 0.1));
    m.insert("action_expert.layer0.bias".into(), mk(vec![64], 0.2));
    m.insert("state_proj.weight".into(), mk(vec![32, 6, 4], 0.3));
    m
}

/// The aggregator and agents of one test, with their directories.
#[derive(Debug)]
pub struct Federation {
    pub dir: PathBuf,
    pub federation: String,
    pub port: u16,
    pub state_dir: PathBuf,
    pub clients: Vec<(String, u64, String)>,
    pub aggregator: Option<ChildGuard>,
    pub agents: BTreeMap<String, ChildGuard>,
    pub broker: Option<ChildGuard>,
    pub broker_kind: BrokerKind,
    /// The training worker the agents run: the real `zk0-train` or the test-only fake worker.
    pub worker: PathBuf,
    /// Prometheus listen address given to the aggregator (empty: disabled).
    pub metrics_listen: String,
    /// Broker logins: username → password. Empty runs everything with `--insecure`.
    pub users: BTreeMap<String, String>,
    /// Directory of `zk0-aggregator certs init` output: serve and connect over mqtts.
    pub tls_dir: Option<PathBuf>,
    /// Per-client dataset directory (default: `<dir>/<cid>/ds-<cid>` with an `examples.txt`
    /// for the fake worker).
    pub datasets: BTreeMap<String, PathBuf>,
    /// Extra TOML lines for every agent's config (e.g. `model_dir`, `worker_args`).
    pub agent_toml: String,
    /// Per-client extra TOML lines, after [`Federation::agent_toml`].
    pub agent_extra: BTreeMap<String, String>,
    /// Extra aggregator TOML (e.g. a `[rounds]` table), written to a config file.
    pub aggregator_toml: String,
    /// Chunk size the aggregator announces (small by default, so blobs span many chunks).
    pub chunk_size: usize,
    /// Per-client worker command replacing `[worker, "train"]` (e.g. the real worker behind a
    /// start delay, see [`crate::smolvla::delayed_worker`]).
    pub worker_cmd: BTreeMap<String, Vec<String>>,
    /// Per-client top-level agent config keys replacing the generated ones (key → TOML value,
    /// e.g. `broker` → `"mqtts://127.0.0.2:1234"`), or added when the template has none.
    pub agent_set: BTreeMap<String, BTreeMap<String, String>>,
    /// Embedded broker listen address (default `127.0.0.1:<port>`).
    pub listen: Option<String>,
    /// `--min-clients` (default: every client of the federation).
    pub min_clients: Option<usize>,
    /// The aggregator's own login on an external broker (`broker.username`/`password`).
    pub broker_login: Option<(String, String)>,
    /// Extra lines for the aggregator config's `[broker]` table.
    pub broker_toml: String,
    /// mosquitto: conf lines for the listener (e.g. the `zk0.conf` of `zk0-aggregator acl
    /// --mosquitto`) instead of `allow_anonymous true`.
    pub mosquitto_conf: Option<String>,
    /// mosquitto: a second loopback listener open to anonymous clients, with no ACL, for the
    /// test's own observer (`per_listener_settings`: the main listener keeps its files).
    pub observer_port: Option<u16>,
    /// Environment variables of the next aggregator started (e.g. `ZK0_HOLD_AT`).
    pub aggregator_env: BTreeMap<String, String>,
    /// The aggregator's `rounds.server_lr` (set it in [`Federation::aggregator_toml`] too), for
    /// [`Federation::verify_rounds`].
    pub server_lr: f64,
}

impl Federation {
    /// Initialises the state dir, agent keys, enrollment and datasets. `clients` are
    /// (id, examples, codec).
    pub fn setup(
        dir: &Path,
        kind: BrokerKind,
        worker: &Path,
        clients: &[(&str, u64, &str)],
    ) -> Result<Federation> {
        Self::setup_with_model(dir, kind, worker, clients, &tiny_model())
    }

    /// [`crate::ensure_built`], then [`Federation::setup`] with the test-only fake worker
    /// (`zk0-fake-worker`, a binary of this crate: its updates are a deterministic function of
    /// the global model).
    pub fn fake(dir: &Path, kind: BrokerKind, clients: &[(&str, u64, &str)]) -> Result<Federation> {
        crate::ensure_built()?;
        Self::setup(dir, kind, &bin("zk0-fake-worker"), clients)
    }

    /// Like [`Federation::setup`], with `model` (trainable tensors) as the initial global model.
    pub fn setup_with_model(
        dir: &Path,
        kind: BrokerKind,
        worker: &Path,
        clients: &[(&str, u64, &str)],
        model: &TensorSet,
    ) -> Result<Federation> {
        anyhow::ensure!(worker.exists(), "worker not found at {}", worker.display());
        let federation = "e2e".to_string();
        let state_dir = dir.join("aggregator");
        let model_path = dir.join("initial.safetensors");
        std::fs::write(&model_path, write_safetensors(model, &BTreeMap::new()))?;
        run_ok(
            Command::new(bin("zk0-aggregator"))
                .arg("--state-dir")
                .arg(&state_dir)
                .arg("init")
                .arg("--model")
                .arg(&model_path),
        )?;
        for (cid, examples, _) in clients {
            let cdir = dir.join(cid);
            std::fs::create_dir_all(cdir.join(format!("ds-{cid}")))?;
            std::fs::write(
                cdir.join(format!("ds-{cid}")).join("examples.txt"),
                examples.to_string(),
            )?;
            run_ok(
                Command::new(bin("zk0-agent"))
                    .args(["keys", "init", "--key"])
                    .arg(cdir.join("agent.key")),
            )?;
            run_ok(
                Command::new(bin("zk0-aggregator"))
                    .arg("--state-dir")
                    .arg(&state_dir)
                    .args(["keys", "enroll", "--client-id", cid])
                    .arg(cdir.join("agent.key.pub")),
            )?;
        }
        let port = free_port()?;
        Ok(Federation {
            dir: dir.to_path_buf(),
            federation,
            port,
            state_dir,
            clients: clients
                .iter()
                .map(|(c, e, k)| (c.to_string(), *e, k.to_string()))
                .collect(),
            aggregator: None,
            agents: BTreeMap::new(),
            broker: None,
            broker_kind: kind,
            worker: worker.to_path_buf(),
            metrics_listen: String::new(),
            users: BTreeMap::new(),
            tls_dir: None,
            datasets: BTreeMap::new(),
            agent_toml: String::new(),
            agent_extra: BTreeMap::new(),
            aggregator_toml: String::new(),
            chunk_size: 4096,
            worker_cmd: BTreeMap::new(),
            agent_set: BTreeMap::new(),
            listen: None,
            min_clients: None,
            broker_login: None,
            broker_toml: String::new(),
            mosquitto_conf: None,
            observer_port: None,
            aggregator_env: BTreeMap::new(),
            server_lr: 1.0,
        })
    }

    /// Starts mosquitto on `port` when the federation uses it. Returns false when the binary
    /// is not installed (the caller skips).
    pub fn start_broker(&mut self) -> Result<bool> {
        if self.broker_kind == BrokerKind::Embedded {
            return Ok(true);
        }
        let Some(mosq) = find_mosquitto() else {
            return Ok(false);
        };
        let conf = self.dir.join("mosquitto.conf");
        let (head, tail) = match self.observer_port {
            Some(p) => (
                "per_listener_settings true\n".to_string(),
                format!("listener {p} 127.0.0.1\nallow_anonymous true\n"),
            ),
            None => (String::new(), String::new()),
        };
        std::fs::write(
            &conf,
            format!(
                "{head}persistence false\nlistener {} 127.0.0.1\nmax_inflight_messages 100\n{}\n{tail}",
                self.port,
                self.mosquitto_conf
                    .as_deref()
                    .unwrap_or("allow_anonymous true")
            ),
        )?;
        let mut cmd = Command::new(mosq);
        cmd.arg("-c").arg(&conf);
        self.broker = Some(ChildGuard::spawn(
            "mosquitto",
            cmd,
            &self.dir.join("mosquitto.log"),
        )?);
        let port = self.port;
        crate::wait_for(Duration::from_secs(10), "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        })?;
        Ok(true)
    }

    /// Makes mosquitto use the files `zk0-aggregator acl --mosquitto` writes for this
    /// federation's [`Federation::users`], with `aggregator` as the aggregator's login (set as
    /// [`Federation::broker_login`] too). Call before [`Federation::start_broker`].
    pub fn use_generated_acl(&mut self, aggregator: (&str, &str)) -> Result<()> {
        self.broker_login = Some((aggregator.0.into(), aggregator.1.into()));
        let mut toml = format!(
            "federation = {:?}\n[broker]\nusername = {:?}\npassword = {:?}\n[broker.users]\n",
            self.federation, aggregator.0, aggregator.1
        );
        for (u, p) in &self.users {
            toml.push_str(&format!("{u:?} = {p:?}\n"));
        }
        let cfg = self.dir.join("acl-config.toml");
        std::fs::write(&cfg, toml)?;
        let acl_dir = self.dir.join("mosquitto-acl");
        run_ok(
            Command::new(bin("zk0-aggregator"))
                .arg("--config")
                .arg(&cfg)
                .args(["acl", "--mosquitto"])
                .arg(&acl_dir),
        )?;
        // The snippet goes in the listener's section (use_username_as_clientid is per
        // listener). Run as root (a CI container), mosquitto would drop to user `mosquitto`,
        // which cannot read the owner-only files; as anyone else `user` has no effect.
        let snippet = std::fs::read_to_string(acl_dir.join("zk0.conf"))?;
        self.mosquitto_conf = Some(format!("user root\n{snippet}"));
        Ok(())
    }

    /// Starts the aggregator for `rounds` rounds with the given deadline.
    pub fn start_aggregator(&mut self, rounds: u64, timeout_s: f64, extra: &[&str]) -> Result<()> {
        let mut cmd = Command::new(bin("zk0-aggregator"));
        if self.users.is_empty() && self.tls_dir.is_none() && self.aggregator_toml.is_empty() {
            cmd.arg("--state-dir")
                .arg(&self.state_dir)
                .arg("serve")
                .arg("--insecure");
        } else {
            // Authenticated embedded broker or extra settings: a config file.
            let mut toml = String::from("[broker]\n");
            if let Some((u, p)) = &self.broker_login {
                toml.push_str(&format!("username = {u:?}\npassword = {p:?}\n"));
            }
            toml.push_str(&self.broker_toml);
            if let Some(d) = &self.tls_dir {
                toml.push_str(&format!(
                    "tls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}\n",
                    d.join("server.pem"),
                    d.join("server.key"),
                    d.join("ca.pem")
                ));
            }
            if !self.users.is_empty() {
                toml.push_str("[broker.users]\n");
                for (u, p) in &self.users {
                    toml.push_str(&format!("{u:?} = {p:?}\n"));
                }
            }
            toml.push_str(&self.aggregator_toml);
            let path = self.dir.join("aggregator.toml");
            std::fs::write(&path, toml)?;
            cmd.arg("--config")
                .arg(&path)
                .arg("--state-dir")
                .arg(&self.state_dir)
                .arg("serve");
            if self.users.is_empty() && self.tls_dir.is_none() {
                cmd.arg("--insecure");
            }
        }
        cmd.arg("--exit-when-done");
        cmd.args([
            "--federation",
            &self.federation,
            "--metrics-listen",
            &self.metrics_listen,
        ]);
        cmd.args([
            "--rounds",
            &rounds.to_string(),
            "--min-clients",
            &self.min_clients.unwrap_or(self.clients.len()).to_string(),
        ]);
        cmd.args([
            "--round-timeout-s",
            &timeout_s.to_string(),
            "--chunk-size",
            &self.chunk_size.to_string(),
        ]);
        match self.broker_kind {
            BrokerKind::Embedded => {
                let listen = self
                    .listen
                    .clone()
                    .unwrap_or_else(|| format!("127.0.0.1:{}", self.port));
                cmd.args(["--listen", &listen]);
            }
            BrokerKind::Mosquitto => {
                let scheme = if self.tls_dir.is_some() {
                    "mqtts"
                } else {
                    "mqtt"
                };
                cmd.args(["--broker", &format!("{scheme}://127.0.0.1:{}", self.port)]);
            }
        }
        cmd.args(extra).envs(&self.aggregator_env);
        let agg = self.aggregator.insert(ChildGuard::spawn(
            "zk0-aggregator",
            cmd,
            &self.dir.join("aggregator.log"),
        )?);
        let port = self.port;
        crate::wait_for(Duration::from_secs(20), "the broker port", || {
            if let Ok(Some(st)) = agg.child.try_wait() {
                return Some(Err(st)); // it gave up (a test may expect that): say so now
            }
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| Ok(()))
        })?
        .map_err(|st| anyhow::anyhow!("zk0-aggregator exited with {st} before it listened"))
    }

    /// Waits up to `timeout` for the aggregator to exit, and requires success.
    pub fn wait_aggregator_ok(&mut self, timeout: Duration) -> Result<()> {
        let st = self
            .aggregator
            .as_mut()
            .context("no aggregator started")?
            .wait_timeout(timeout)?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        Ok(())
    }

    /// Enrolls `key` under client id `cid` with `zk0-aggregator keys enroll`, as an operator
    /// does (for test clients that are not agents of this federation).
    pub fn enroll(&self, cid: &str, key: &shared_proto::sign::PublicKey) -> Result<()> {
        let path = self.dir.join(format!("{cid}.enrolled.pub"));
        zk0_daemon::keys::save_public_key(&path, key)?;
        run_ok(
            Command::new(bin("zk0-aggregator"))
                .arg("--state-dir")
                .arg(&self.state_dir)
                .args(["keys", "enroll", "--client-id", cid])
                .arg(&path),
        )?;
        Ok(())
    }

    /// The aggregator's public key (written by `init`).
    pub fn aggregator_key(&self) -> Result<shared_proto::sign::PublicKey> {
        Ok(zk0_daemon::keys::load_public_key(
            self.state_dir.join("aggregator.pub"),
        )?)
    }

    /// Starts (or restarts) one agent.
    pub fn start_agent(&mut self, cid: &str, max_rounds: u64) -> Result<()> {
        self.start_agent_env(cid, max_rounds, &[])
    }

    /// Starts (or restarts) one agent with extra environment (e.g. `ZK0_FAKE_WORKER_SLEEP_MS`).
    pub fn start_agent_env(
        &mut self,
        cid: &str,
        max_rounds: u64,
        env: &[(&str, &str)],
    ) -> Result<()> {
        let (_, _, codec) = self
            .clients
            .iter()
            .find(|c| c.0 == cid)
            .context("unknown client")?
            .clone();
        let cdir = self.dir.join(cid);
        let worker = match self.worker_cmd.get(cid) {
            Some(cmd) => format!("{cmd:?}"),
            None => format!("[{:?}, \"train\"]", self.worker),
        };
        let cfg = format!(
            "client_id = {cid:?}\nfederation = {fed:?}\nbroker = \"{scheme}://127.0.0.1:{port}\"\n{login}\n{ca}\n\
             key_file = {key:?}\naggregator_key = {agg:?}\ndataset = {ds:?}\ncache_dir = {cache:?}\n\
             work_dir = {work:?}\ncodec = {codec:?}\nworker = {worker}\n{common}\n{extra}\n",
            fed = self.federation,
            port = self.port,
            scheme = if self.tls_dir.is_some() { "mqtts" } else { "mqtt" },
            ca = match &self.tls_dir {
                Some(d) => format!("ca_file = {:?}", d.join("ca.pem")),
                None => String::new(),
            },
            login = match self.users.get(cid) {
                Some(p) => format!("username = {cid:?}\npassword = {p:?}"),
                None => "insecure = true".to_string(),
            },
            key = cdir.join("agent.key"),
            agg = self.state_dir.join("aggregator.pub"),
            ds = self
                .datasets
                .get(cid)
                .cloned()
                .unwrap_or_else(|| cdir.join(format!("ds-{cid}"))),
            common = self.agent_toml,
            extra = self.agent_extra.get(cid).map(String::as_str).unwrap_or(""),
            cache = cdir.join("cache"),
            work = cdir.join("work"),
        );
        let cfg = match self.agent_set.get(cid) {
            Some(set) => set_toml_keys(&cfg, set),
            None => cfg,
        };
        let cfg_path = cdir.join("agent.toml");
        std::fs::write(&cfg_path, cfg)?;
        let mut cmd = Command::new(bin("zk0-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .args(["--max-rounds", &max_rounds.to_string()]);
        cmd.envs(env.iter().copied());
        let g = ChildGuard::spawn(cid, cmd, &self.dir.join(format!("{cid}.log")))?;
        self.agents.insert(cid.to_string(), g);
        Ok(())
    }

    /// SIGKILLs an agent and every process below it (its training worker), as when a robot
    /// loses power: a worker left running would keep training for a dead agent.
    pub fn kill_agent(&mut self, cid: &str) -> Result<()> {
        let g = self
            .agents
            .get_mut(cid)
            .with_context(|| format!("no agent {cid}"))?;
        let tree = descendants(g.child.id());
        g.kill();
        for pid in tree {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        Ok(())
    }

    /// The aggregator's persisted state (as JSON).
    pub fn state(&self) -> Result<serde_json::Value> {
        let b = std::fs::read(self.state_dir.join("state.json"))?;
        Ok(serde_json::from_slice(&b)?)
    }

    /// Waits until the persisted state satisfies `f`.
    pub fn wait_state(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        crate::wait_for(timeout, what, || self.state().ok().filter(|s| f(s)))
    }

    /// A stored global model by id.
    pub fn model(&self, id: &str) -> Result<TensorSet> {
        let b = std::fs::read(
            self.state_dir
                .join("models")
                .join(format!("{id}.safetensors")),
        )?;
        Ok(read_safetensors(&b)?.0)
    }

    /// The last lines of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    s.push_str(&format!("==== {} ====\n", p.display()));
                    for l in tail.into_iter().rev() {
                        s.push_str(l);
                        s.push('\n');
                    }
                }
            }
        }
        s
    }

    /// Checks every finished round: the published model equals (1e-6) the example-weighted
    /// average of the clients' decoded deltas (× [`Federation::server_lr`]) applied to the
    /// round's base model, recomputed here from what the observer saw on the wire, over the
    /// accepted updates the round did not exclude. Returns the number of rounds checked.
    pub fn verify_rounds(&self, seen: &Observed) -> Result<usize> {
        let state = self.state()?;
        let history = state["history"]
            .as_array()
            .context("state has no history")?;
        for h in history {
            let round = h["round"].as_u64().context("round")?;
            let base_id = h["base_model_id"].as_str().context("base id")?;
            let new_id = h["model_id"].as_str().context("model id")?;
            let base = self.model(base_id)?;
            let spec = ModelSpec::from_tensors(&base);
            let excluded: Vec<&str> = h["excluded"]
                .as_array()
                .map(|e| e.iter().filter_map(|x| x["client_id"].as_str()).collect())
                .unwrap_or_default();
            let accepted: Vec<String> = h["accepted"]
                .as_array()
                .context("accepted")?
                .iter()
                .filter_map(|v| v.as_str())
                .filter(|c| !excluded.contains(c))
                .map(String::from)
                .collect();
            anyhow::ensure!(!accepted.is_empty(), "round {round} accepted nobody");
            let mut expected: BTreeMap<String, Vec<f64>> = base
                .iter()
                .map(|(k, t)| (k.clone(), t.data.iter().map(|x| f64::from(*x)).collect()))
                .collect();
            let mut sum: BTreeMap<String, Vec<f64>> = base
                .iter()
                .map(|(k, t)| (k.clone(), vec![0.0; t.data.len()]))
                .collect();
            let mut total = 0.0f64;
            for cid in &accepted {
                let (blob, m) = seen.update_blob(cid, round).with_context(|| {
                    format!("observer missed the update of {cid} in round {round}")
                })?;
                anyhow::ensure!(
                    shared_proto::hash::sha256_hex(&blob) == m.sha256,
                    "observed blob of {cid}/{round} does not hash"
                );
                let delta = shared_proto::codec::decode_delta(&blob, &spec, 1 << 30)?;
                let w = m.examples as f64;
                total += w;
                for (k, t) in &delta {
                    for (s, x) in sum.get_mut(k).context("tensor")?.iter_mut().zip(&t.data) {
                        *s += w * f64::from(*x);
                    }
                }
            }
            for (k, e) in expected.iter_mut() {
                for (x, s) in e.iter_mut().zip(&sum[k]) {
                    *x += self.server_lr * s / total;
                }
            }
            // The model as published on the wire (not just the aggregator's file).
            let published = seen
                .model_blob(new_id)
                .with_context(|| format!("observer missed published model {new_id}"))?;
            anyhow::ensure!(
                shared_proto::hash::sha256_hex(&published) == new_id,
                "published model {new_id} does not hash to its id"
            );
            let (got, _) = read_safetensors(&published)?;
            let mut max_err = 0.0f64;
            for (k, e) in &expected {
                let g = &got
                    .get(k)
                    .with_context(|| format!("published model lacks {k}"))?
                    .data;
                anyhow::ensure!(g.len() == e.len(), "tensor {k} length");
                for (a, b) in g.iter().zip(e) {
                    max_err = max_err.max((f64::from(*a) - b).abs());
                }
            }
            anyhow::ensure!(
                max_err <= 1e-6,
                "round {round}: published model differs from the weighted average by {max_err:e}"
            );
            eprintln!("round {round}: {} clients, published model matches the weighted average (max |err| = {max_err:.2e})", accepted.len());
        }
        Ok(history.len())
    }
}

/// `toml` with each top-level `key = …` line of `set` replaced (or, when absent, added at the
/// top, where it is still top-level).
fn set_toml_keys(toml: &str, set: &BTreeMap<String, String>) -> String {
    let mut lines: Vec<String> = toml.lines().map(String::from).collect();
    for (k, v) in set {
        let line = format!("{k} = {v}");
        let at = lines
            .iter()
            .position(|l| l.split_once('=').is_some_and(|(lk, _)| lk.trim() == k));
        match at {
            Some(i) => lines[i] = line,
            None => lines.insert(0, line),
        }
    }
    lines.join("\n") + "\n"
}

/// Every descendant of `pid` (Linux `/proc/<pid>/task/*/children`), children first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    // Bounded: a process tree of a test agent is a handful of processes.
    while let Some(p) = todo.pop() {
        if out.len() > 256 {
            break;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for k in kids
                .split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok())
            {
                out.push(k);
                todo.push(k);
            }
        }
    }
    out
}

impl Federation {
    /// The whole happy path of a run: the aggregator (broker already started) for `rounds`
    /// rounds of at most `round_s` seconds, an [`Observer`] on the wire, then every client's
    /// agent; waits for the aggregator to finish (within `timeout`), checks every round with
    /// [`Federation::verify_rounds`] and that every agent exited cleanly. Returns the final
    /// persisted state for the test's own checks.
    pub fn run_rounds(
        &mut self,
        clients: &[(&str, u64, &str)],
        rounds: u64,
        round_s: f64,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        self.start_aggregator(rounds, round_s, &[])?;
        let observer = Observer::start(self.port, &self.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        for (cid, _, _) in clients {
            self.start_agent(cid, rounds)?;
        }
        self.finish_and_verify(&observer, rounds, timeout)?;
        for (cid, _, _) in clients {
            if let Some(a) = self.agents.get_mut(*cid) {
                let st = a.wait_timeout(Duration::from_secs(20))?;
                anyhow::ensure!(st.success(), "agent {cid} exited with {st}");
            }
        }
        self.state()
    }
}

impl Federation {
    /// Waits (within `timeout`) for the aggregator to exit cleanly, then checks that `rounds`
    /// rounds ran and each passes [`Federation::verify_rounds`] against what `observer` saw.
    pub fn finish_and_verify(
        &mut self,
        observer: &Observer,
        rounds: u64,
        timeout: Duration,
    ) -> Result<()> {
        let st = self
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(timeout)?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        // Give the observer a moment to drain the last publishes.
        std::thread::sleep(Duration::from_millis(500));
        let n = {
            let seen = observer
                .seen
                .lock()
                .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
            self.verify_rounds(&seen)?
        };
        anyhow::ensure!(
            n as u64 == rounds,
            "expected {rounds} rounds, state has {n}"
        );
        Ok(())
    }
}

/// `mosquitto` on PATH or in /usr/sbin.
pub fn find_mosquitto() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/local/sbin".into());
    dirs.into_iter()
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}
