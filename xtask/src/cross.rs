//! `cargo xtask cross`: build the daemons and the trainer for aarch64 robot hosts (Jetson,
//! JetPack 6 = Ubuntu 22.04, glibc 2.35) and exercise them under qemu-user: the daemons'
//! smoke tests and inference, then a real training step and an evaluation with `zk0-train`
//! against the aarch64 libtorch of the PyPI torch wheel.

use crate::tasks::{ensure_rustup, ensure_system, root, run, target_dir, NO_LIBTORCH_PACKAGES};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const TARGET: &str = "aarch64-unknown-linux-gnu";
/// JetPack 6 is Ubuntu 22.04: binaries must not need symbols newer than glibc 2.35.
const MAX_GLIBC: (u32, u32) = (2, 35);
const BINARIES: &[&str] = &["zk0-agent", "zk0-aggregator"];

#[derive(clap::Args, Debug)]
pub struct CrossArgs {
    /// Build with the release profile (what you deploy); the default dev profile is faster to build.
    #[arg(long)]
    pub release: bool,
    /// Build only; skip the qemu runs.
    #[arg(long)]
    pub no_run: bool,
    /// Only the daemons: skip the aarch64 libtorch and `zk0-train`.
    #[arg(long)]
    pub daemons_only: bool,
}

pub fn cross(args: &CrossArgs) -> Result<()> {
    ensure_system(&[
        ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
        // torch-sys compiles tch's C++ wrapper of libtorch.
        ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
        ("qemu-aarch64-static", "qemu-user-static"),
    ])?;
    ensure_rustup(&[], &[TARGET])?;
    let mut build = cargo_aarch64(args.release);
    build.args(NO_LIBTORCH_PACKAGES.iter().flat_map(|p| ["-p", p]));
    let libtorch = if args.daemons_only {
        // No libtorch here: the build itself proves these packages need none.
        build.env_remove("LIBTORCH");
        None
    } else {
        let t = Instant::now();
        let libtorch = crate::setup::libtorch_aarch64()?;
        eprintln!(
            "[cross] aarch64 libtorch {} ready in {:.0} s",
            libtorch.display(),
            t.elapsed().as_secs_f64()
        );
        // One build with the daemons: built apart, the trainer's smaller feature set of
        // their shared dependencies rebuilt half of them. No aarch64 FFmpeg dev packages:
        // without its default `libav` feature the trainer decodes through the `ffmpeg` CLI
        // (`--no-default-features` applies to every package built; `cargo xtask test` checks
        // the daemons' graph has no libtorch).
        no_default_features_in_daemons()?;
        build
            .args(["-p", "trainer", "--no-default-features"])
            .env("LIBTORCH", &libtorch)
            .env("CXX_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-g++");
        Some(libtorch)
    };
    let t = Instant::now();
    run(&mut build)?;
    eprintln!(
        "[cross] aarch64 build ({}) in {:.0} s",
        if libtorch.is_some() {
            "daemons and zk0-train"
        } else {
            "daemons"
        },
        t.elapsed().as_secs_f64()
    );

    let profile = if args.release { "release" } else { "debug" };
    let dir = target_dir().join(TARGET).join(profile);
    let t = Instant::now();
    for bin in BINARIES {
        let path = dir.join(bin);
        check_binary(&path)?;
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
        eprintln!(
            "[cross] daemons under qemu in {:.0} s",
            t.elapsed().as_secs_f64()
        );
    }
    let Some(libtorch) = libtorch else {
        return Ok(());
    };
    let train = dir.join("zk0-train");
    check_binary(&train)?;
    if !args.no_run {
        let t = Instant::now();
        train_under_qemu(&train, &libtorch)?;
        eprintln!(
            "[cross] zk0-train under qemu in {:.0} s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The daemons are built with `--no-default-features` (for the trainer's sake), which must not
/// change them: none may have default features.
fn no_default_features_in_daemons() -> Result<()> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    for pkg in meta["packages"]
        .as_array()
        .context("cargo metadata: no packages")?
    {
        let name = pkg["name"].as_str().unwrap_or("");
        if NO_LIBTORCH_PACKAGES.contains(&name) && pkg["features"].get("default").is_some() {
            bail!("{name} has default features, which the aarch64 build (--no-default-features) would drop");
        }
    }
    Ok(())
}

/// `cargo build --target aarch64-unknown-linux-gnu` with the cross toolchain.
fn cargo_aarch64(release: bool) -> Command {
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .current_dir(root())
        .args(["build", "--target", TARGET])
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar")
        .env_remove("LIBTORCH_USE_PYTORCH");
    if release {
        build.arg("--release");
    }
    build
}

/// An aarch64 ELF that needs no glibc newer than JetPack 6's.
fn check_binary(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.get(..4) != Some(b"\x7fELF".as_slice())
        || bytes.get(18..20) != Some([0xb7, 0x00].as_slice())
    {
        bail!("{} is not an aarch64 ELF binary", path.display());
    }
    let bin = path.file_name().unwrap_or_default().to_string_lossy();
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
    Ok(())
}

/// `qemu-aarch64-static` in a private mount namespace that shows it an aarch64
/// `/proc/cpuinfo`: qemu-user 7.2 (Debian 12) passes the host's x86 one through, and the
/// cpuinfo libraries in onnxruntime and libtorch parse it as an ARM one (onnxruntime crashes
/// while it loads). `None` where `unshare -m` and the bind mount are not allowed (they need
/// root or CAP_SYS_ADMIN).
fn qemu_with_aarch64_cpuinfo() -> Result<Option<Command>> {
    let cpuinfo = target_dir().join(TARGET).join("cpuinfo-aarch64");
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
        return Ok(None);
    }
    let mut c = bind(" && shift && exec \"$@\"");
    c.arg("qemu-aarch64-static")
        .args(["-L", "/usr/aarch64-linux-gnu"]);
    Ok(Some(c))
}

const NO_UNSHARE: &str = "needs `unshare -m` and a bind mount (root or CAP_SYS_ADMIN) to give \
                          qemu-user an aarch64 /proc/cpuinfo";

/// Runs `cmd` to completion; its stdout, or an error with its stderr.
fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let o = cmd
        .output()
        .with_context(|| format!("running {what} under qemu"))?;
    if !o.status.success() {
        bail!(
            "{what} under qemu failed: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The robot's inference path on aarch64: the committed tiny export
/// (tests/fixtures/smolvla-tiny-onnx) through the aarch64 `zk0-agent infer` and the aarch64
/// onnxruntime from PyPI, under qemu; its first chunk on `lerobot-v3-tiny` episode 0 with the
/// committed noise must be LeRobot's `sample.actions[0]`.
fn infer_under_qemu(agent: &Path) -> Result<()> {
    let ort = crate::setup::onnxruntime_aarch64()?;
    let fx = root().join("tests/fixtures");
    let export = fx.join("smolvla-tiny-onnx");
    let out = target_dir()
        .join(TARGET)
        .join("infer-under-qemu.safetensors");
    let Some(mut qemu) = qemu_with_aarch64_cpuinfo()? else {
        eprintln!(
            "NOT RUN: zk0-agent infer under qemu {NO_UNSHARE}; the aarch64 build itself passed"
        );
        return Ok(());
    };
    output(
        qemu.arg(agent)
            .args(["infer", "--threads", "1", "--episode", "0", "--model"])
            .arg(&export)
            .arg("--dataset")
            .arg(fx.join("lerobot-v3-tiny"))
            .arg("--noise")
            .arg(export.join("noise.safetensors"))
            .arg("--onnxruntime")
            .arg(&ort)
            .arg("--out")
            .arg(&out),
        "zk0-agent infer",
    )?;
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

/// The robot's training path on aarch64, under qemu with the aarch64 libtorch: the loss of
/// the vendored tiny SmolVLA on its fixture batch must be LeRobot's; two FedProx steps on
/// `lerobot-v3-tiny` (videos decoded by the `ffmpeg` CLI) must write finite metrics and the
/// trainable tensors of the model with their shapes; `eval` of the trained weights on an
/// episode must report a finite loss over its 24 frames.
fn train_under_qemu(train: &Path, libtorch: &Path) -> Result<()> {
    let fx = root().join("tests/fixtures");
    let tiny = fx.join("smolvla-tiny");
    let pipeline = tiny.join("pipeline");
    let dataset = fx.join("lerobot-v3-tiny");
    let work = target_dir().join(TARGET).join("train-under-qemu");
    std::fs::create_dir_all(&work)?;
    if qemu_with_aarch64_cpuinfo()?.is_none() {
        eprintln!("NOT RUN: zk0-train under qemu {NO_UNSHARE}; the aarch64 build itself passed");
        return Ok(());
    }
    // The aarch64 loader finds libtorch here; the x86 `ffmpeg` the trainer spawns skips
    // these (wrong-class) libraries.
    let qemu = || -> Result<Command> {
        let mut c = qemu_with_aarch64_cpuinfo()?.context("unshare stopped working")?;
        c.env("LD_LIBRARY_PATH", libtorch.join("lib"))
            .arg(train)
            .args(["--threads", "1"]);
        Ok(c)
    };

    let t = Instant::now();
    let out = output(
        qemu()?
            .args(["loss", "--model"])
            .arg(&tiny)
            .arg("--inputs")
            .arg(tiny.join("inputs.safetensors")),
        "zk0-train loss",
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("zk0-train loss printed no JSON:\n{out}"))?;
    let ours = v["loss"].as_f64().context("no loss in zk0-train loss")?;
    let lerobot = f64::from(read_f32(&tiny.join("expected.safetensors"), "train.loss")?[0]);
    // The x86_64 build is held to 1e-6 (trainer/tests/cli.rs); another CPU's kernels sum in
    // other orders.
    let rel = ((ours - lerobot) / lerobot).abs();
    if !rel.is_finite() || rel > 1e-5 {
        bail!("aarch64 loss {ours} differs from LeRobot's {lerobot} by {rel:.1e} (relative)");
    }
    eprintln!(
        "zk0-train loss under qemu: {ours} ({rel:.1e} relative off LeRobot's {lerobot}) in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let (params, metrics) = (work.join("params.safetensors"), work.join("metrics.json"));
    output(
        qemu()?
            .args(["train", "--model"])
            .arg(pipeline.join("model"))
            .arg("--tokenizer")
            .arg(pipeline.join("tokenizer.json"))
            .arg("--dataset")
            .arg(&dataset)
            .args(["--steps", "2", "--batch-size", "2", "--lr", "1e-3"])
            .args(["--seed", "7", "--mu", "0.01", "--out-params"])
            .arg(&params)
            .arg("--out-metrics")
            .arg(&metrics),
        "zk0-train train",
    )?;
    let secs = t.elapsed().as_secs_f64();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics)?)
        .with_context(|| format!("parsing {}", metrics.display()))?;
    let loss = m["loss"].as_f64().unwrap_or(f64::NAN);
    if !loss.is_finite() || m["steps"] != 2 || m["examples"] != 4 {
        bail!("zk0-train train under qemu wrote unexpected metrics: {m}");
    }
    let trained = check_trained(&params, &pipeline.join("model/model.safetensors"))?;
    if m["trainable_tensors"] != trained {
        bail!("{trained} tensors in the params file, metrics say {m}");
    }
    eprintln!(
        "zk0-train train under qemu: 2 steps of batch 2, loss {loss:.6}, update norm {:.6}, \
         {trained} finite trainable tensors of the model's shapes; {secs:.1} s (steps {:.1} s)",
        m["update_norm"].as_f64().unwrap_or(f64::NAN),
        m["seconds"].as_f64().unwrap_or(f64::NAN),
    );

    let t = Instant::now();
    let eval = work.join("eval.json");
    output(
        qemu()?
            .args(["eval", "--model"])
            .arg(pipeline.join("model"))
            .arg("--global")
            .arg(&params)
            .arg("--tokenizer")
            .arg(pipeline.join("tokenizer.json"))
            .arg("--dataset")
            .arg(&dataset)
            .args(["--episodes", "1", "--out"])
            .arg(&eval),
        "zk0-train eval",
    )?;
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&eval)?)
        .with_context(|| format!("parsing {}", eval.display()))?;
    let loss = e["loss"].as_f64().unwrap_or(f64::NAN);
    // lerobot-v3-tiny's episode 0 has 24 frames.
    if !(loss.is_finite() && loss > 0.0) || e["frames"] != 24 || e["episodes"] != 1 {
        bail!("zk0-train eval under qemu reported {e}");
    }
    eprintln!(
        "zk0-train eval under qemu (the trained params): episode 0, 24 frames, loss \
         {loss:.6}; {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The number of tensors in a trained params file, each finite and named as a tensor of the
/// model with its dtype and shape.
fn check_trained(params: &Path, model: &Path) -> Result<usize> {
    let (ph, pb) = safetensors(params)?;
    let (mh, _) = safetensors(model)?;
    let mut n = 0;
    for (name, t) in ph.as_object().context("params header is no object")? {
        if name == "__metadata__" {
            continue;
        }
        let m = &mh[name];
        if m["dtype"] != t["dtype"] || m["shape"] != t["shape"] {
            bail!("params tensor {name} {t} is not the model's ({m})");
        }
        if t["dtype"] == "F32" && tensor_f32(&ph, &pb, name)?.iter().any(|x| !x.is_finite()) {
            bail!("params tensor {name} is not finite");
        }
        n += 1;
    }
    if n == 0 {
        bail!("{} holds no tensors", params.display());
    }
    Ok(n)
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

/// A safetensors file's header (JSON after an 8-byte length) and the whole file.
fn safetensors(path: &Path) -> Result<(serde_json::Value, Vec<u8>)> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let n = u64::from_le_bytes(b.get(..8).context("short file")?.try_into()?) as usize;
    let h = serde_json::from_slice(b.get(8..8 + n).context("short header")?)
        .with_context(|| format!("{}: bad header", path.display()))?;
    Ok((h, b))
}

/// Tensor `name`'s values, which must be float32 (data follows the header).
fn tensor_f32(header: &serde_json::Value, file: &[u8], name: &str) -> Result<Vec<f32>> {
    let t = &header[name];
    if t["dtype"] != "F32" {
        bail!("{name} is not F32");
    }
    let n = u64::from_le_bytes(file[..8].try_into()?) as usize;
    let off = |i: usize| t["data_offsets"][i].as_u64().map(|v| v as usize + 8 + n);
    let (s, e) = (off(0).context("offsets")?, off(1).context("offsets")?);
    Ok(file
        .get(s..e)
        .context("data out of range")?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// A float32 tensor of a safetensors file.
fn read_f32(path: &Path, name: &str) -> Result<Vec<f32>> {
    let (h, b) = safetensors(path)?;
    tensor_f32(&h, &b, name).with_context(|| path.display().to_string())
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
    use super::{check_trained, max_glibc};
    use std::path::Path;

    /// A safetensors file of float32 tensors: (name, shape, values).
    fn write(path: &Path, tensors: &[(&str, &[usize], &[f32])]) {
        let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
        for (name, shape, values) in tensors {
            let start = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut file = (h.len() as u64).to_le_bytes().to_vec();
        file.extend(h);
        file.extend(data);
        std::fs::write(path, file).unwrap();
    }

    #[test]
    fn trained_params_must_be_finite_tensors_of_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let (model, params) = (dir.path().join("m"), dir.path().join("p"));
        write(
            &model,
            &[("a", &[2], &[1.0, 2.0]), ("b", &[1, 2], &[3.0, 4.0])],
        );
        write(&params, &[("b", &[1, 2], &[3.5, 4.5])]);
        assert_eq!(check_trained(&params, &model).unwrap(), 1);
        write(&params, &[("b", &[2], &[3.5, 4.5])]);
        assert!(check_trained(&params, &model).is_err(), "wrong shape");
        write(&params, &[("c", &[2], &[3.5, 4.5])]);
        assert!(check_trained(&params, &model).is_err(), "not the model's");
        write(&params, &[("b", &[1, 2], &[f32::NAN, 4.5])]);
        assert!(check_trained(&params, &model).is_err(), "NaN");
        write(&params, &[]);
        assert!(check_trained(&params, &model).is_err(), "empty");
    }

    #[test]
    fn finds_newest_glibc_symbol_version() {
        let blob = b"\0GLIBC_2.17\0memcpy\0GLIBC_2.34\0GLIBC_2.3.4\0GLIBC_PRIVATE\0";
        assert_eq!(max_glibc(blob), (2, 34));
        assert_eq!(max_glibc(b"no versions"), (0, 0));
    }
}
