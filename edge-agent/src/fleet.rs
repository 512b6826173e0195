//! `start` / `stop` for the daemon, with zk0bot's habits: `start` runs `serve` as a detached
//! background process (its own process group, stdin closed, output appended to a log file)
//! and records its pid in a pidfile in the state dir; a second `start` is refused while that
//! process lives; `stop` sends SIGTERM and waits for the exit. A pidfile whose process is gone
//! (or is some other program that reused the pid) is stale and removed.
//!
//! The aggregator has the same pidfile code (`aggregator/src/fleet.rs`). Besides, the running
//! agent keeps a small status file (round, last loss, connected) that `zk0-agent status`
//! prints: [`AgentStatus`].

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A background daemon identified by its binary name and a directory for its files.
pub struct Daemon {
    /// Program name: names the pid and log files and must appear in the process's argv[0].
    pub name: &'static str,
    pub dir: PathBuf,
}

/// How long `start` watches the new process before calling it started.
const STARTUP_GRACE: Duration = Duration::from_millis(1500);

impl Daemon {
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join(format!("{}.pid", self.name))
    }

    pub fn logfile(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// The pid of the running daemon; removes a stale pidfile and answers `None`.
    pub fn running(&self) -> Result<Option<u32>> {
        let path = self.pidfile();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        match text.trim().parse::<u32>() {
            Ok(pid) if alive(pid, self.name) => Ok(Some(pid)),
            _ => {
                tracing::info!(pidfile = %path.display(), "removing a stale pidfile");
                let _ = std::fs::remove_file(&path);
                Ok(None)
            }
        }
    }

    /// Starts `exe args…` detached; refuses when the daemon already runs. Fails (with the
    /// log's tail) when the process exits during the first moments.
    pub fn start(&self, exe: &Path, args: &[OsString]) -> Result<u32> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        if let Some(pid) = self.running()? {
            anyhow::bail!(
                "{} is already running (pid {pid}, pidfile {}); stop it first",
                self.name,
                self.pidfile().display()
            );
        }
        let log_path = self.logfile();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let log_len = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Its own process group: a Ctrl-C in the starting terminal does not reach it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let pid = child.id();
        // create_new: of two concurrent starts, exactly one claims the pidfile.
        let claimed = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.pidfile())
            .and_then(|mut f| writeln!(f, "{pid}").and_then(|_| f.sync_all()));
        if let Err(e) = claimed {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e).with_context(|| {
                format!("claiming {} (another start?)", self.pidfile().display())
            });
        }
        let t0 = Instant::now();
        while t0.elapsed() < STARTUP_GRACE {
            if let Some(status) = child.try_wait()? {
                let _ = std::fs::remove_file(self.pidfile());
                anyhow::bail!(
                    "{} exited at start ({status}); log {}:\n{}",
                    self.name,
                    log_path.display(),
                    log_tail(&log_path, log_len, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pid)
    }

    /// SIGTERM to the running daemon, then waits up to `timeout` for it to exit. `None` when
    /// it was not running.
    pub fn stop(&self, timeout: Duration) -> Result<Option<u32>> {
        let Some(pid) = self.running()? else {
            return Ok(None);
        };
        let p = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("pid out of range")?;
        rustix::process::kill_process(p, rustix::process::Signal::TERM)
            .with_context(|| format!("signalling {} (pid {pid})", self.name))?;
        let t0 = Instant::now();
        while alive(pid, self.name) {
            anyhow::ensure!(
                t0.elapsed() < timeout,
                "{} (pid {pid}) still running {}s after SIGTERM",
                self.name,
                timeout.as_secs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(self.pidfile());
        Ok(Some(pid))
    }
}

/// Whether `pid` is a live (not zombie) process running program `name`. Without /proc, only
/// liveness is checked.
fn alive(pid: u32, name: &str) -> bool {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    let proc_dir = Path::new("/proc").join(pid.to_string());
    if Path::new("/proc/self").exists() {
        let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
            return false;
        };
        // The state follows the parenthesised command name; Z = exited, not yet reaped.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next());
        if matches!(state, Some('Z' | 'X') | None) {
            return false;
        }
        let argv0 = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
        let argv0 = argv0.split(|b| *b == 0).next().unwrap_or_default();
        return String::from_utf8_lossy(argv0).contains(name);
    }
    rustix::process::test_kill_process(p).is_ok()
}

/// What the process wrote to `path` after byte offset `from`: from its `Error:` line when
/// there is one (a backtrace may follow it), else the last `lines` lines.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
    let all: Vec<&str> = text.lines().collect();
    match all.iter().position(|l| l.starts_with("Error:")) {
        Some(i) => all[i..]
            .iter()
            .take(lines)
            .copied()
            .collect::<Vec<_>>()
            .join("\n"),
        None => all[all.len().saturating_sub(lines)..].join("\n"),
    }
}

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
pub fn start(args: &crate::federate::RunArgs) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_foreign_pidfiles_are_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon {
            name: "zk0-agent",
            dir: dir.path().to_path_buf(),
        };
        assert_eq!(d.running().unwrap(), None);
        // Our own pid is alive, but its program is not `no-such-daemon`: a reused pid.
        let other = Daemon {
            name: "no-such-daemon",
            dir: dir.path().to_path_buf(),
        };
        std::fs::write(other.pidfile(), format!("{}\n", std::process::id())).unwrap();
        assert_eq!(other.running().unwrap(), None);
        assert!(!other.pidfile().exists(), "stale pidfile removed");
        std::fs::write(d.pidfile(), "not a pid").unwrap();
        assert_eq!(d.running().unwrap(), None);
        assert!(!d.pidfile().exists());
        assert_eq!(d.stop(Duration::from_secs(1)).unwrap(), None);
    }
}
