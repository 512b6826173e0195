//! `start` / `stop` for a daemon, with zk0bot's habits: `start` runs the daemon as a detached
//! background process (its own process group, stdin closed, output appended to a log file)
//! and records its pid in a pidfile; a second `start` is refused while that process lives;
//! `stop` sends SIGTERM and waits for the exit. A pidfile whose process is gone (or is some
//! other program that reused the pid) is stale and removed. Shared by `zk0-aggregator
//! start|stop` and `zk0-agent start|stop`.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_foreign_pidfiles_are_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon {
            name: "zk0-test-daemon",
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
