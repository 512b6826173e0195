//! What a zk0 host has: CPU, memory, disk, GPU, onnxruntime, serial ports and cameras.
//!
//! `zk0-agent doctor` and `zk0-aggregator doctor` print these facts, and the agent reports
//! the hardware part in its MQTT status. Everything here reads the running system (sysinfo,
//! /proc, /sys, /dev) and never fails: what cannot be read is reported as absent.
//! [`hf_cache`] finds checkpoints already in the local Hugging Face cache.

pub mod checklist;
pub mod daemon;
mod devices;
pub mod hf_cache;
mod onnxruntime;
pub mod reference;
pub mod systemd;

pub use checklist::{emit, gib, Check, Checklist, Status};
pub use devices::{serial_ports, video_devices, SerialPort, VideoDevice};
pub use onnxruntime::{find_onnxruntime, OnnxRuntime};

/// This process's peak resident set size in KiB (`VmHWM` of /proc/self/status), when known:
/// what the benchmarks and `zk0-agent infer --bench` report as peak memory.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

use serde::Serialize;
use std::path::Path;

/// Operating system, architecture and CPU.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub os: String,
    pub kernel: String,
    pub arch: String,
    pub cpu: String,
    pub cores: usize,
}

/// Memory in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// The filesystem holding a path.
#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub path: String,
    pub mount_point: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// An accelerator, if one is visible.
#[derive(Debug, Clone, Serialize)]
pub struct Gpu {
    pub name: String,
    pub memory_bytes: Option<u64>,
    /// How it was found: `nvidia-smi`, `tegra` (Jetson) or `procfs`.
    pub source: String,
}

pub fn host() -> Host {
    let mut sys = sysinfo::System::new();
    sys.refresh_cpu_all();
    let cpu = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "unknown".into());
    Host {
        os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.into()),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.into(),
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

pub fn memory() -> Memory {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    Memory {
        total_bytes: sys.total_memory(),
        available_bytes: sys.available_memory(),
    }
}

/// The disk whose mount point is the longest prefix of `path` (which need not exist yet).
pub fn disk_for(path: &Path) -> Option<Disk> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| abs.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| Disk {
            path: abs.display().to_string(),
            mount_point: d.mount_point().display().to_string(),
            total_bytes: d.total_space(),
            available_bytes: d.available_space(),
        })
}

/// The NVIDIA GPU (discrete, via nvidia-smi) or Jetson module (via the L4T release file).
pub fn gpu() -> Option<Gpu> {
    let smi = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output();
    if let Ok(out) = smi {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(line) = text.lines().next() {
                let mut parts = line.split(',').map(str::trim);
                let name = parts.next().unwrap_or("NVIDIA GPU").to_string();
                let mib = parts.next().and_then(|m| m.parse::<u64>().ok());
                return Some(Gpu {
                    name,
                    memory_bytes: mib.map(|m| m << 20),
                    source: "nvidia-smi".into(),
                });
            }
        }
    }
    if let Ok(release) = std::fs::read_to_string("/etc/nv_tegra_release") {
        let model = std::fs::read_to_string("/proc/device-tree/model")
            .map(|m| m.trim_end_matches('\0').trim().to_string())
            .unwrap_or_else(|_| "NVIDIA Jetson".into());
        let l4t = release.lines().next().unwrap_or("").trim().to_string();
        return Some(Gpu {
            name: format!("{model} ({l4t})"),
            memory_bytes: None,
            source: "tegra".into(),
        });
    }
    std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .map(|v| Gpu {
            name: v
                .lines()
                .next()
                .unwrap_or("NVIDIA driver")
                .trim()
                .to_string(),
            memory_bytes: None,
            source: "procfs".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_facts_are_plausible() {
        let h = host();
        assert_eq!(h.arch, std::env::consts::ARCH);
        assert!(h.cores >= 1);
        let m = memory();
        assert!(m.total_bytes > 0 && m.available_bytes <= m.total_bytes);
    }

    #[test]
    fn disk_for_a_missing_path_uses_its_mount() {
        let d = disk_for(Path::new("/surely/not/here")).expect("/ is mounted");
        assert_eq!(d.mount_point, "/");
        assert!(d.total_bytes >= d.available_bytes);
    }
}
