//! `zk0-agent start|stop|status`: the agent as a background daemon (pidfile, log and status
//! file in its work dir), through [`zk0_host::daemon::Daemon`] as `zk0-aggregator` does. The
//! running agent keeps a small status file (round, last loss, connected) that `zk0-agent
//! status` prints: [`AgentStatus`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use zk0_host::daemon::Daemon;

/// `status.json` in the agent's work dir, rewritten (atomically) by the running daemon.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AgentStatus {
    pub client_id: String,
    pub pid: u32,
    pub dataset: String,
    /// Connected to the broker right now.
    pub connected: bool,
    /// Latest round announced by the aggregator.
    pub round: u64,
    /// Last round this agent trained, and the loss it reported for it.
    pub trained_round: u64,
    pub last_loss: Option<f64>,
    /// Whether the aggregator accepted the last update (`None`: no answer yet).
    pub last_accepted: Option<bool>,
    pub rounds_done: u64,
    pub updated_unix_ms: u64,
    /// The last training or encoding failure (`None`: none since the start).
    pub last_error: Option<String>,
    /// What went wrong so far (malformed messages, rejected models, failed workers, …).
    pub counters: crate::federate::core::Counters,
    /// The `seq` of the newest round announcement acted on: a restarted agent refuses older
    /// ones (replays).
    #[serde(default)]
    pub announcement_seq: u64,
    /// The aggregator's last signed status (`None`: none seen yet).
    #[serde(default)]
    pub server_online: Option<bool>,
}

impl AgentStatus {
    pub fn path(work_dir: &Path) -> PathBuf {
        work_dir.join("status.json")
    }

    /// Writes to a temporary file and renames it over, so a reader never sees half a file.
    pub fn write(&self, work_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(work_dir)?;
        let path = Self::path(work_dir);
        let tmp = work_dir.join("status.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(work_dir: &Path) -> Result<Option<AgentStatus>> {
        let path = Self::path(work_dir);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// `zk0-agent stop` / `status` arguments: where the agent's files are.
#[derive(clap::Args, Debug)]
pub struct ControlArgs {
    /// Agent config file (TOML); its `work_dir` holds the pidfile, log and status file.
    #[arg(long, short, env = "ZK0_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override `work_dir`.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

impl ControlArgs {
    fn work_dir(&self) -> Result<PathBuf> {
        let cfg = crate::federate::config::AgentConfig::load(self.config.as_deref())?;
        Ok(self.work_dir.clone().unwrap_or(cfg.work_dir))
    }
}

fn daemon(work_dir: PathBuf) -> Daemon {
    Daemon {
        name: "zk0-agent",
        dir: work_dir,
    }
}

/// `zk0-agent start`: `zk0-agent run` with the same options, in the background.
pub fn start(args: &crate::cli::RunArgs) -> Result<()> {
    let cfg = crate::federate::config::AgentConfig::load(args.config.as_deref())?;
    let work_dir = args.work_dir.clone().unwrap_or(cfg.work_dir);
    // The daemon gets this very command line with `run` for `start`.
    let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    if let Some(a) = argv.iter_mut().find(|a| *a == "start") {
        *a = "run".into();
    }
    let d = daemon(work_dir);
    let exe = std::env::current_exe().context("locating zk0-agent")?;
    let pid = d.start(&exe, &argv)?;
    println!(
        "zk0-agent started (pid {pid}); log {}",
        d.logfile().display()
    );
    Ok(())
}

/// `zk0-agent stop`.
pub fn stop(args: &ControlArgs, timeout: Duration) -> Result<()> {
    match daemon(args.work_dir()?).stop(timeout)? {
        Some(pid) => println!("zk0-agent stopped (pid {pid})"),
        None => println!("zk0-agent is not running"),
    }
    Ok(())
}

/// `zk0-agent status`: running or not, connected or not, round, last local loss.
pub fn status(args: &ControlArgs, json: bool) -> Result<()> {
    let dir = args.work_dir()?;
    let pid = daemon(dir.clone()).running()?;
    let mut st = AgentStatus::read(&dir)?.unwrap_or_default();
    // A stopped (or killed) agent is not connected, whatever its last status file says.
    if pid.is_none() || pid != Some(st.pid) {
        st.connected = false;
    }
    if json {
        let mut v = serde_json::to_value(&st)?;
        v["running"] = pid.is_some().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match pid {
        Some(pid) => println!("daemon:     running (pid {pid})"),
        None => println!("daemon:     not running"),
    }
    println!("client:     {}", st.client_id);
    println!("connected:  {}", if st.connected { "yes" } else { "no" });
    println!("round:      {}", st.round);
    match st.last_loss {
        Some(l) => println!(
            "last loss:  {l:.6} (round {}{})",
            st.trained_round,
            match st.last_accepted {
                Some(true) => ", accepted",
                Some(false) => ", rejected",
                None => "",
            }
        ),
        None => println!("last loss:  -"),
    }
    println!("rounds:     {}", st.rounds_done);
    println!("dataset:    {}", st.dataset);
    Ok(())
}
