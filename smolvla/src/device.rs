//! The `--device` option: `auto` (the first CUDA device when libtorch sees one, else the CPU),
//! `cpu`, `cuda` or `cuda:N`.

use tch::Device;

use crate::{Error, Result};

/// Parses a device name; `cuda[:N]` is an error when libtorch sees no such CUDA device.
pub fn parse_device(s: &str) -> Result<Device> {
    let bad = || Error::invalid(format!("device {s:?}: expected auto, cpu, cuda or cuda:N"));
    let dev = match s.trim().to_ascii_lowercase().as_str() {
        "auto" => return Ok(Device::cuda_if_available()),
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(bad)?,
    };
    let n = tch::Cuda::device_count();
    if (dev as i64) >= n {
        return Err(Error::invalid(format!(
            "device {s:?}: libtorch sees {n} CUDA device(s){}",
            if tch::Cuda::is_available() {
                ""
            } else {
                " (CPU-only build or no driver)"
            }
        )));
    }
    Ok(Device::Cuda(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("CPU").unwrap(), Device::Cpu);
        assert_eq!(parse_device("auto").unwrap(), Device::cuda_if_available());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
        if !tch::Cuda::is_available() {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("CUDA device"), "{e}");
        }
    }
}
