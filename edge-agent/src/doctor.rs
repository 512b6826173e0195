//! `zk0-agent doctor`: is this robot host ready? Hardware, runtimes, devices, config.
//!
//! Prints a checklist (or `--json`). Warnings do not fail the command: a host without a GPU
//! or camera can still take part; `--strict` turns any failed check into exit code 1.

use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zk0_host::Checklist;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON object instead of a checklist.
    #[arg(long)]
    json: bool,
    /// Agent config file (default: $ZK0_AGENT_CONFIG, /etc/zk0/agent.toml, ~/.config/zk0/agent.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Exit with status 1 when any check fails.
    #[arg(long)]
    strict: bool,
}

#[derive(Serialize)]
struct Report {
    version: &'static str,
    host: zk0_host::Host,
    memory: zk0_host::Memory,
    disk: Option<zk0_host::Disk>,
    gpu: Option<zk0_host::Gpu>,
    onnxruntime: Option<zk0_host::OnnxRuntime>,
    zk0_train: Option<Worker>,
    serial_ports: Vec<zk0_host::SerialPort>,
    video_devices: Vec<zk0_host::VideoDevice>,
    config: ConfigCheck,
    checks: Checklist,
}

/// The libtorch worker the agent spawns for training.
#[derive(Serialize)]
struct Worker {
    path: String,
    version: Option<String>,
}

#[derive(Serialize)]
struct ConfigCheck {
    path: Option<String>,
    found: bool,
    valid: bool,
    error: Option<String>,
}

/// Config candidates in the order the daemon reads them.
fn config_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("ZK0_AGENT_CONFIG") {
        c.push(PathBuf::from(p));
    }
    c.push(PathBuf::from("/etc/zk0/agent.toml"));
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(x) = xdg {
        c.push(x.join("zk0/agent.toml"));
    }
    c
}

fn check_config(explicit: Option<&Path>) -> ConfigCheck {
    let candidates = config_candidates(explicit);
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        return ConfigCheck {
            path: explicit.map(|p| p.display().to_string()),
            found: false,
            valid: false,
            error: None,
        };
    };
    // The daemon's own loader and checks, so "valid" means `zk0-agent run` accepts it.
    let parsed = crate::federate::config::AgentConfig::load(Some(path))
        .and_then(|c| c.validate())
        .map_err(|e| format!("{e:#}"));
    ConfigCheck {
        path: Some(path.display().to_string()),
        found: true,
        valid: parsed.is_ok(),
        error: parsed.err(),
    }
}

/// `zk0-train` beside this binary, else on PATH; its `--version` names the libtorch it runs on.
fn find_worker() -> Option<Worker> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("zk0-train")));
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("zk0-train"))
            .find(|p| p.is_file())
    });
    let path = beside.filter(|p| p.is_file()).or(on_path)?;
    let version = run_with_timeout(&path, &["--version"], Duration::from_secs(20));
    Some(Worker {
        path: path.display().to_string(),
        version,
    })
}

fn run_with_timeout(bin: &Path, args: &[&str], timeout: Duration) -> Option<String> {
    let mut child = std::process::Command::new(bin)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                let mut out = String::new();
                std::io::Read::read_to_string(&mut child.stdout.take()?, &mut out).ok()?;
                return Some(out.trim().to_string());
            }
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn build_report(args: &Args) -> Report {
    let host = zk0_host::host();
    let memory = zk0_host::memory();
    let state_dir = std::env::var_os("STATE_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/zk0-agent"));
    let disk = zk0_host::disk_for(&state_dir);
    let gpu = zk0_host::gpu();
    let onnxruntime = zk0_host::find_onnxruntime();
    let zk0_train = find_worker();
    let serial_ports = zk0_host::serial_ports();
    let video_devices = zk0_host::video_devices();
    let config = check_config(args.config.as_deref());

    let mut checks = Checklist::default();
    checks.add_host_checks(&host, &memory, disk.as_ref(), 4 << 30, 10 << 30);
    let mut check = |name, ok, warn_only, detail: String| checks.add(name, ok, warn_only, detail);
    match &gpu {
        Some(g) => check("gpu", true, true, g.name.clone()),
        None => check("gpu", false, true, "none: training runs on the CPU".into()),
    }
    match &onnxruntime {
        Some(o) => check(
            "onnxruntime",
            o.version.is_some(),
            false,
            match (&o.version, &o.error) {
                (Some(v), _) => format!("{v} at {}", o.path),
                (None, e) => format!("{} does not load: {}", o.path, e.as_deref().unwrap_or("?")),
            },
        ),
        None => check(
            "onnxruntime",
            false,
            false,
            "not found: set ORT_DYLIB_PATH".into(),
        ),
    }
    match &zk0_train {
        Some(w) => check(
            "zk0-train",
            w.version.is_some(),
            false,
            format!(
                "{} ({})",
                w.path,
                w.version.as_deref().unwrap_or("does not run")
            ),
        ),
        None => check(
            "zk0-train",
            false,
            false,
            "not beside zk0-agent nor on PATH".into(),
        ),
    }
    let usable_ports = serial_ports.iter().filter(|p| p.accessible).count();
    check(
        "serial ports",
        usable_ports > 0,
        true,
        if serial_ports.is_empty() {
            "none (is the servo bus adapter plugged in?)".into()
        } else {
            format!(
                "{} found, {usable_ports} usable (others: join the dialout group)",
                serial_ports.len()
            )
        },
    );
    let usable_cams = video_devices.iter().filter(|v| v.accessible).count();
    check(
        "cameras",
        usable_cams > 0,
        true,
        if video_devices.is_empty() {
            "none".into()
        } else {
            format!(
                "{} found, {usable_cams} usable (others: join the video group)",
                video_devices.len()
            )
        },
    );
    check(
        "config",
        config.valid,
        !config.found,
        match (&config.path, config.found, &config.error) {
            (Some(p), true, None) => format!("{p} (valid)"),
            (Some(p), true, Some(e)) => format!("{p}: {e}"),
            _ => "no agent.toml found".into(),
        },
    );
    Report {
        version: env!("CARGO_PKG_VERSION"),
        host,
        memory,
        disk,
        gpu,
        onnxruntime,
        zk0_train,
        serial_ports,
        video_devices,
        config,
        checks,
    }
}

pub fn run(args: Args) -> Result<()> {
    let report = build_report(&args);
    if args.json {
        zk0_host::emit(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        let head = format!(
            "zk0-agent {} on {} ({})\n",
            report.version, report.host.os, report.host.kernel
        );
        zk0_host::emit(&(head + &report.checks.render()))?;
    }
    if args.strict && report.checks.any_failed() {
        std::process::exit(1);
    }
    Ok(())
}
