//! Helpers for the workspace end-to-end tests: locating the built binaries and the vendored
//! fixtures, LeRobot's venv python, free loopback ports, child processes that are killed when
//! dropped, and a live process's memory ([`procmem`], for the benchmarks).
//!
//! The daemons are found in the workspace target dir (`$CARGO_TARGET_DIR` or `<workspace>/target`,
//! `debug` profile). [`ensure_built`] runs `cargo build -p aggregator -p edge-agent` once per
//! test process so `cargo test -p zk0-e2e` works from a clean tree (set `ZK0_E2E_NO_BUILD=1` to
//! use the binaries already built); the test-only
//! `zk0-fake-worker` comes from this crate (`CARGO_BIN_EXE_zk0-fake-worker` in test targets).

pub mod fake_hub;
pub mod federation;
pub mod procmem;
pub mod smolvla;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The cargo target dir: `$CARGO_TARGET_DIR` (relative to the workspace) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    if target.is_absolute() {
        target
    } else {
        workspace_root().join(target)
    }
}

/// `<target>/debug`, honouring `CARGO_TARGET_DIR`.
pub fn target_debug_dir() -> PathBuf {
    target_dir().join("debug")
}

/// Path of a workspace binary in the debug target dir.
pub fn bin(name: &str) -> PathBuf {
    target_debug_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// Builds the daemons (`cargo build -p aggregator -p edge-agent`) once per test process.
pub fn ensure_built() -> Result<()> {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if std::env::var_os("ZK0_E2E_NO_BUILD").is_some() {
                return Ok(()); // use the binaries already in the target dir
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .current_dir(workspace_root())
                .args(["build", "-p", "aggregator", "-p", "edge-agent"])
                .status()
                .map_err(|e| format!("running cargo build: {e}"))?;
            if st.success() {
                Ok(())
            } else {
                Err(format!(
                    "cargo build -p aggregator -p edge-agent failed: {st}"
                ))
            }
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

pub use zk0_host::reference::lerobot_python;

/// A free TCP port on 127.0.0.1 (bound, then released; the small race is acceptable in tests).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    pub name: String,
    pub child: Child,
}

impl ChildGuard {
    /// Spawns `cmd`, appending its stdout+stderr to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<ChildGuard> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let f2 = f.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child,
        })
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "{} still running after {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` (`TERM`, `INT`, …) with kill(1); panics if it cannot be delivered.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let st = Command::new("kill")
            .args([format!("-{signal}").as_str(), &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{signal} {pid}: {st}");
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A harness-less benchmark's `main`: runs `body`, printing its error (with causes) and
/// failing the exit status when it fails.
pub fn bench_main(body: impl FnOnce() -> Result<()>) -> std::process::ExitCode {
    match body() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A benchmark's own arguments: those after the program name, less the `--bench` cargo
/// passes to harness-less targets.
pub fn bench_args() -> impl Iterator<Item = String> {
    std::env::args().skip(1).filter(|a| a != "--bench")
}

/// Builds `packages` (release or dev profile) for a benchmark, unless `ZK0_BENCH_NO_BUILD`
/// is set, and returns the profile's dir, `<target>/release` or `<target>/debug`.
pub fn bench_build(packages: &[&str], release: bool) -> Result<PathBuf> {
    if std::env::var_os("ZK0_BENCH_NO_BUILD").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).arg("build");
        if release {
            cmd.arg("--release");
        }
        for p in packages {
            cmd.args(["-p", p]);
        }
        let st = cmd.status().context("running cargo build")?;
        anyhow::ensure!(st.success(), "{cmd:?} failed: {st}");
    }
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command to completion, failing with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `zk0-agent dataset synth DIR`: a seeded H.264 dataset of `episodes` × `frames` with
/// `cameras` (`NAME:WIDTHxHEIGHT`).
pub fn synth_dataset(
    dir: &Path,
    episodes: usize,
    frames: usize,
    cameras: &[&str],
    seed: u64,
) -> Result<()> {
    let mut cmd = Command::new(bin("zk0-agent"));
    cmd.args(["dataset", "synth"]).arg(dir);
    cmd.args([
        "--episodes",
        &episodes.to_string(),
        "--frames",
        &frames.to_string(),
    ]);
    cmd.args(["--vcodec", "libx264", "--seed", &seed.to_string()]);
    for c in cameras {
        cmd.args(["--camera", c]);
    }
    run_ok(&mut cmd).map(drop)
}

/// A plain HTTP/1.1 GET on loopback (e.g. the aggregator's `/metrics`): the whole response,
/// Sum of every sample of `metric` (all its label sets) in a Prometheus text page.
pub fn metric_sum(page: &str, metric: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// headers included.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
