//! Serial ports (Feetech servo bus adapters) and V4L2 cameras, read from /dev and /sys.

use serde::Serialize;
use std::path::Path;

/// A serial device a servo bus adapter may be on.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SerialPort {
    pub path: String,
    /// Stable name from /dev/serial/by-id, when udev made one.
    pub by_id: Option<String>,
    /// Whether this process may open it (else: add the user to `dialout`).
    pub accessible: bool,
}

/// A V4L2 video device.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VideoDevice {
    pub path: String,
    pub name: Option<String>,
    /// Whether this process may open it (else: add the user to `video`).
    pub accessible: bool,
}

fn accessible(path: &Path) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .is_ok()
}

fn dev_entries(dev: &Path, prefixes: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dev)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// USB serial adapters (ttyUSB, ttyACM) and Jetson UARTs (ttyTHS).
pub fn serial_ports() -> Vec<SerialPort> {
    serial_ports_in(Path::new("/dev"))
}

fn serial_ports_in(dev: &Path) -> Vec<SerialPort> {
    let by_id: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(dev.join("serial/by-id"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let target = std::fs::canonicalize(e.path()).ok()?;
                    Some((e.path().display().to_string(), target))
                })
                .collect()
        })
        .unwrap_or_default();
    dev_entries(dev, &["ttyUSB", "ttyACM", "ttyTHS"])
        .into_iter()
        .map(|name| {
            let path = dev.join(&name);
            SerialPort {
                by_id: by_id
                    .iter()
                    .find(|(_, t)| *t == path)
                    .map(|(l, _)| l.clone()),
                accessible: accessible(&path),
                path: path.display().to_string(),
            }
        })
        .collect()
}

/// /dev/videoN with the driver's name from /sys/class/video4linux.
pub fn video_devices() -> Vec<VideoDevice> {
    dev_entries(Path::new("/dev"), &["video"])
        .into_iter()
        .map(|name| {
            let path = Path::new("/dev").join(&name);
            VideoDevice {
                name: std::fs::read_to_string(format!("/sys/class/video4linux/{name}/name"))
                    .ok()
                    .map(|n| n.trim().to_string()),
                accessible: accessible(&path),
                path: path.display().to_string(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_serial_adapters_and_their_by_id_links() {
        let dir = std::env::temp_dir().join(format!("zk0-host-dev-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("serial/by-id")).unwrap();
        for f in ["ttyUSB0", "ttyACM1", "tty0", "video0"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        std::os::unix::fs::symlink(
            dir.join("ttyACM1"),
            dir.join("serial/by-id/usb-Feetech-if00"),
        )
        .unwrap();
        let ports = serial_ports_in(&dir);
        let paths: Vec<&str> = ports
            .iter()
            .map(|p| p.path.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(paths, ["ttyACM1", "ttyUSB0"]);
        assert!(ports[0]
            .by_id
            .as_deref()
            .unwrap()
            .ends_with("usb-Feetech-if00"));
        assert!(ports[1].by_id.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
