//! `cargo xtask cross`: build the daemons for aarch64 robot hosts (Jetson, JetPack 6 =
//! Ubuntu 22.04, glibc 2.35) and smoke-test them under qemu-user.

use crate::tasks::{ensure_rustup, ensure_system, root, run, target_dir, NO_LIBTORCH_PACKAGES};
use anyhow::{bail, Context, Result};
use std::process::Command;

const TARGET: &str = "aarch64-unknown-linux-gnu";
/// JetPack 6 is Ubuntu 22.04: binaries must not need symbols newer than glibc 2.35.
const MAX_GLIBC: (u32, u32) = (2, 35);
const BINARIES: &[&str] = &["zk0-agent", "zk0-aggregator"];

#[derive(clap::Args, Debug)]
pub struct CrossArgs {
    /// Build with the release profile (what you deploy); the default dev profile is faster to build.
    #[arg(long)]
    pub release: bool,
    /// Build only; skip the qemu smoke test.
    #[arg(long)]
    pub no_run: bool,
}

pub fn cross(args: &CrossArgs) -> Result<()> {
    ensure_system(&[
        ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
        ("qemu-aarch64-static", "qemu-user-static"),
    ])?;
    ensure_rustup(&[], &[TARGET])?;
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .current_dir(root())
        .args(["build", "--target", TARGET])
        .args(NO_LIBTORCH_PACKAGES.iter().flat_map(|p| ["-p", p]))
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar")
        // No libtorch exists for this target here: the build itself proves these packages
        // need none.
        .env_remove("LIBTORCH")
        .env_remove("LIBTORCH_USE_PYTORCH");
    if args.release {
        build.arg("--release");
    }
    run(&mut build)?;

    let profile = if args.release { "release" } else { "debug" };
    let dir = target_dir().join(TARGET).join(profile);
    for bin in BINARIES {
        let path = dir.join(bin);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if bytes.get(..4) != Some(b"\x7fELF".as_slice())
            || bytes.get(18..20) != Some([0xb7, 0x00].as_slice())
        {
            bail!("{} is not an aarch64 ELF binary", path.display());
        }
        let glibc = max_glibc(&bytes);
        if glibc > MAX_GLIBC {
            bail!(
                "{bin} needs GLIBC_{}.{}, newer than JetPack 6's 2.35",
                glibc.0,
                glibc.1
            );
        }
        eprintln!(
            "{bin}: aarch64 ELF, {} MB, needs GLIBC_{}.{} at most",
            bytes.len() >> 20,
            glibc.0,
            glibc.1
        );
        if args.no_run {
            continue;
        }
        for cmd_args in [&["--version"][..], &["doctor", "--json"][..]] {
            let out = Command::new("qemu-aarch64-static")
                .args(["-L", "/usr/aarch64-linux-gnu"])
                .arg(&path)
                .args(cmd_args)
                .output()
                .context("running qemu-aarch64-static")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                bail!(
                    "{bin} {} under qemu failed: {}\n{}",
                    cmd_args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if cmd_args[0] == "doctor" {
                let v: serde_json::Value = serde_json::from_str(&stdout)
                    .with_context(|| format!("{bin} doctor --json printed no JSON:\n{stdout}"))?;
                let arch = v
                    .pointer("/host/arch")
                    .and_then(|a| a.as_str())
                    .unwrap_or("?");
                if arch != "aarch64" {
                    bail!("{bin} doctor under qemu reports arch {arch:?}, expected aarch64");
                }
                eprintln!("{bin} doctor --json under qemu: valid JSON, arch {arch}");
            } else {
                eprintln!("{bin} --version under qemu: {}", stdout.trim());
            }
        }
    }
    if !args.no_run {
        infer_under_qemu(&dir.join("zk0-agent"))?;
    }
    Ok(())
}

/// The robot's inference path on aarch64: the committed tiny export
/// (tests/fixtures/smolvla-tiny-onnx) through the aarch64 `zk0-agent infer` and the aarch64
/// onnxruntime from PyPI, under qemu; its first chunk on `lerobot-v3-tiny` episode 0 with the
/// committed noise must be LeRobot's `sample.actions[0]`.
fn infer_under_qemu(agent: &std::path::Path) -> Result<()> {
    let ort = crate::setup::onnxruntime_aarch64()?;
    let fx = root().join("tests/fixtures");
    let export = fx.join("smolvla-tiny-onnx");
    let work = target_dir().join(TARGET);
    let out = work.join("infer-under-qemu.safetensors");
    // qemu-user 7.2 (Debian 12) passes the host's x86 /proc/cpuinfo through, and
    // onnxruntime's cpuinfo crashes parsing it as an ARM one while the library loads. A
    // private mount namespace shows it an aarch64 one (two Cortex-A78AE cores, as on a Jetson
    // Orin) instead.
    let cpuinfo = work.join("cpuinfo-aarch64");
    std::fs::write(&cpuinfo, aarch64_cpuinfo())?;
    let bind = |then: &str| {
        let mut c = Command::new("unshare");
        c.args(["-m", "sh", "-c"])
            .arg(format!("mount --bind \"$1\" /proc/cpuinfo{then}"))
            .arg("sh")
            .arg(&cpuinfo);
        c
    };
    if !bind("").status().is_ok_and(|s| s.success()) {
        eprintln!(
            "NOT RUN: zk0-agent infer under qemu needs `unshare -m` and a bind mount (root or \
             CAP_SYS_ADMIN) to give qemu-user an aarch64 /proc/cpuinfo; the aarch64 build \
             itself passed"
        );
        return Ok(());
    }
    let o = bind(" && shift && exec \"$@\"")
        .arg("qemu-aarch64-static")
        .args(["-L", "/usr/aarch64-linux-gnu"])
        .arg(agent)
        .args(["infer", "--threads", "1", "--episode", "0", "--model"])
        .arg(&export)
        .arg("--dataset")
        .arg(fx.join("lerobot-v3-tiny"))
        .arg("--noise")
        .arg(export.join("noise.safetensors"))
        .arg("--onnxruntime")
        .arg(&ort)
        .arg("--out")
        .arg(&out)
        .output()
        .context("running qemu-aarch64-static")?;
    if !o.status.success() {
        bail!(
            "zk0-agent infer under qemu failed: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let ours = read_f32(&out, "actions")?;
    let theirs = read_f32(
        &fx.join("smolvla-tiny/pipeline/expected.safetensors"),
        "sample.actions",
    )?;
    let per = theirs.len() / 3;
    let max = ours[..per]
        .iter()
        .zip(&theirs[..per])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let spread = theirs[..per].iter().fold(0f32, |m, x| m.max(x.abs()));
    if max > 1e-5 * spread.max(1.0) {
        bail!("aarch64 chunk differs from LeRobot's by {max} (|action| up to {spread})");
    }
    eprintln!(
        "zk0-agent infer under qemu (aarch64 onnxruntime {}): first chunk within {max:.2e} of \
         LeRobot's (|action| up to {spread:.1})",
        crate::setup::ORT_VERSION
    );
    Ok(())
}

/// An aarch64 `/proc/cpuinfo` (two Cortex-A78AE cores, the Jetson Orin's) for qemu-user.
fn aarch64_cpuinfo() -> String {
    (0..2)
        .map(|n| {
            format!(
                "processor\t: {n}\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull \
                 sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n\
                 CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n\
                 CPU part\t: 0xd42\nCPU revision\t: 1\n\n"
            )
        })
        .collect()
}

/// A float32 tensor of a safetensors file (header: 8-byte length, JSON; then the data).
fn read_f32(path: &std::path::Path, name: &str) -> Result<Vec<f32>> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let n = u64::from_le_bytes(b.get(..8).context("short file")?.try_into()?) as usize;
    let h: serde_json::Value = serde_json::from_slice(b.get(8..8 + n).context("short header")?)?;
    let t = &h[name];
    if t["dtype"] != "F32" {
        bail!("{}: {name} is not F32", path.display());
    }
    let off = |i: usize| t["data_offsets"][i].as_u64().map(|v| v as usize + 8 + n);
    let (s, e) = (off(0).context("offsets")?, off(1).context("offsets")?);
    Ok(b.get(s..e)
        .context("data out of range")?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The newest `GLIBC_x.y` version string the binary refers to (its .dynstr holds them).
fn max_glibc(bytes: &[u8]) -> (u32, u32) {
    let pat = b"GLIBC_";
    let mut best = (0, 0);
    let mut i = 0;
    while let Some(pos) = bytes[i..].windows(pat.len()).position(|w| w == pat) {
        let start = i + pos + pat.len();
        let end = bytes[start..]
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'.'))
            .map_or(bytes.len(), |e| start + e);
        let text = std::str::from_utf8(&bytes[start..end]).unwrap_or("");
        let mut parts = text.split('.').filter_map(|p| p.parse::<u32>().ok());
        if let (Some(a), Some(b)) = (parts.next(), parts.next()) {
            best = best.max((a, b));
        }
        i = end.max(start);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::max_glibc;

    #[test]
    fn finds_newest_glibc_symbol_version() {
        let blob = b"\0GLIBC_2.17\0memcpy\0GLIBC_2.34\0GLIBC_2.3.4\0GLIBC_PRIVATE\0";
        assert_eq!(max_glibc(blob), (2, 34));
        assert_eq!(max_glibc(b"no versions"), (0, 0));
    }
}
