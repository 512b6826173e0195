//! Plumbing the trainer's benchmarks share (`mod common;` in each).

// Each bench compiles its own copy and uses a part of it.
#![allow(dead_code)]

use std::process::Command;

use serde_json::Value;

/// Runs one side of a benchmark and returns its JSON report (the last JSON line on stdout).
pub fn run_json(mut cmd: Command, what: &str) -> Result<Value, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("{what}: no JSON report in {stdout}"))
}

/// A child process run to its end while its memory is sampled.
pub struct Measured {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Spawn to exit.
    pub wall_s: f64,
    /// Peak over the samples of the summed RSS / PSS of the process and all its descendants
    /// (LeRobot's dataloader workers are processes; PSS counts pages they share once).
    pub peak_rss_kib: u64,
    pub peak_pss_kib: u64,
}

/// `Rss` and `Pss` (kB) of one process from `/proc/PID/smaps_rollup`; zeros once it is gone.
fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// `root` and its descendants, from every process's parent in `/proc/PID/stat`.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// Runs `cmd` with its output captured, sampling the memory of its process tree every 100 ms.
pub fn run_measured(mut cmd: Command, what: &str) -> Result<Measured, String> {
    use std::io::Read;
    use std::process::Stdio;
    let t0 = std::time::Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let (mut peak_rss_kib, mut peak_pss_kib) = (0, 0);
    let status = loop {
        let (rss, pss) = process_tree(child.id())
            .into_iter()
            .map(rss_pss_kib)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        peak_rss_kib = peak_rss_kib.max(rss);
        peak_pss_kib = peak_pss_kib.max(pss);
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(100)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let wall_s = t0.elapsed().as_secs_f64();
    Ok(Measured {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        wall_s,
        peak_rss_kib,
        peak_pss_kib,
    })
}
