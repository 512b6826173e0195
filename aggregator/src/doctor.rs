//! `zk0-aggregator doctor`: can this VM run the aggregator? Host, state dir, config, ports.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use zk0_host::Checklist;

use crate::config::Config;

#[derive(Serialize)]
struct Report {
    version: &'static str,
    host: zk0_host::Host,
    memory: zk0_host::Memory,
    disk: Option<zk0_host::Disk>,
    gpu: Option<zk0_host::Gpu>,
    state_dir: String,
    broker: String,
    checks: Checklist,
}

/// Whether `addr` can be listened on now (nothing else holds it, and we may bind it).
fn bindable(addr: &str) -> std::result::Result<(), String> {
    TcpListener::bind(addr).map(drop).map_err(|e| e.to_string())
}

/// Whether an external broker at `mqtt[s]://host:port` accepts TCP connections.
fn reachable(url: &str) -> std::result::Result<(), String> {
    let u = zk0_daemon::BrokerUrl::parse(url).map_err(|e| e.to_string())?;
    let addr = (u.host.as_str(), u.port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The state dir (or, before first start, its nearest existing ancestor) takes a file.
/// Leaves nothing behind.
fn writable(dir: &Path) -> std::result::Result<(), String> {
    let abs = std::path::absolute(dir).map_err(|e| e.to_string())?;
    let existing = abs
        .ancestors()
        .find(|d| d.is_dir())
        .ok_or("no existing ancestor")?;
    let probe = existing.join(format!(".zk0-doctor-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| format!("{}: {e}", existing.display()))?;
    std::fs::remove_file(&probe).map_err(|e| e.to_string())
}

pub fn run(cfg: &Config, config_path: Option<&Path>, json: bool) -> Result<bool> {
    let mut checks = Checklist::default();
    let host = zk0_host::host();
    let memory = zk0_host::memory();
    let disk = zk0_host::disk_for(&cfg.state_dir);
    // 2 GiB of memory and 20 GiB of disk: a model, its accumulator and spooled updates.
    checks.add_host_checks(&host, &memory, disk.as_ref(), 2 << 30, 20 << 30);
    let sd = writable(&cfg.state_dir);
    checks.add(
        "state dir",
        sd.is_ok(),
        false,
        match sd {
            Ok(()) => format!("{} is writable", cfg.state_dir.display()),
            Err(e) => format!("{}: {e}", cfg.state_dir.display()),
        },
    );
    let valid = cfg.validate();
    checks.add(
        "config",
        valid.is_ok(),
        false,
        match (&valid, config_path) {
            (Ok(()), Some(p)) => format!("{} is valid", p.display()),
            (Ok(()), None) => "defaults (no config file)".into(),
            (Err(e), _) => format!("{e:#}"),
        },
    );
    let broker = if cfg.broker.url.is_empty() {
        let b = bindable(&cfg.broker.listen);
        checks.add(
            "broker",
            b.is_ok(),
            false,
            match b {
                Ok(()) => format!("embedded broker can listen on {}", cfg.broker.listen),
                Err(e) => format!("cannot listen on {}: {e}", cfg.broker.listen),
            },
        );
        format!("embedded on {}", cfg.broker.listen)
    } else {
        let r = reachable(&cfg.broker.url);
        checks.add(
            "broker",
            r.is_ok(),
            false,
            match r {
                Ok(()) => format!("{} accepts connections", cfg.broker.url),
                Err(e) => format!("{} unreachable: {e}", cfg.broker.url),
            },
        );
        cfg.broker.url.clone()
    };
    if !cfg.metrics.listen.is_empty() {
        let m = bindable(&cfg.metrics.listen);
        checks.add(
            "metrics",
            m.is_ok(),
            true,
            match m {
                Ok(()) => format!("/metrics can listen on {}", cfg.metrics.listen),
                Err(e) => format!("cannot listen on {}: {e}", cfg.metrics.listen),
            },
        );
    }
    let failed = checks.any_failed();
    let report = Report {
        version: env!("CARGO_PKG_VERSION"),
        host,
        memory,
        disk,
        gpu: zk0_host::gpu(),
        state_dir: cfg.state_dir.display().to_string(),
        broker,
        checks,
    };
    if json {
        zk0_host::emit(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        let head = format!(
            "zk0-aggregator {} on {} ({})\n",
            report.version, report.host.os, report.host.kernel
        );
        zk0_host::emit(&(head + &report.checks.render()))?;
    }
    Ok(!failed)
}
