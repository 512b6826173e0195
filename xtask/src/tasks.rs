//! `test`, `demo`, `bench`, `fuzz`: cargo runs with the environment from `setup`.

use crate::setup::{self, Env, SetupArgs};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Repository root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Cargo's target dir: `$CARGO_TARGET_DIR` (relative to the repository root) or `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root().join(t) })
        .unwrap_or_else(|| root().join("target"))
}

/// Run a command to completion, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    eprintln!("\n$ {}", line.replace('"', ""));
    let status = cmd.status().with_context(|| format!("starting {line}"))?;
    if !status.success() {
        bail!("{} failed ({status})", line.replace('"', ""));
    }
    Ok(())
}

/// `cargo` in the repo root with our environment.
pub fn cargo(env: &Env) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    env.apply(&mut cmd);
    cmd
}

fn have(tool: &str) -> bool {
    holds(&format!("command -v {tool}"))
}

/// Whether a `sh` command line succeeds (its output discarded).
fn holds(check: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("{check} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Install missing system tools (Debian packages) when we may, else say how.
pub fn ensure_system(tools: &[(&str, &str)]) -> Result<()> {
    let checks: Vec<(String, &str)> = tools
        .iter()
        .map(|(bin, pkg)| (format!("command -v {bin}"), *pkg))
        .collect();
    ensure_packages(&checks)
}

/// What building lerobot-dataset's `libav` feature needs (the trainer and the e2e tests turn it
/// on; ffmpeg-sys-next finds FFmpeg through pkg-config and reads its headers with bindgen, which
/// needs libclang and clang's own headers): `sh` checks and the Debian package each stands for.
pub const LIBAV_BUILD: &[(&str, &str)] = &[
    ("command -v pkg-config", "pkg-config"),
    ("pkg-config --exists libavcodec", "libavcodec-dev"),
    ("pkg-config --exists libavformat", "libavformat-dev"),
    ("pkg-config --exists libavutil", "libavutil-dev"),
    ("pkg-config --exists libswscale", "libswscale-dev"),
    ("command -v clang", "clang"),
    ("ls /usr/lib/llvm-*/lib/libclang.so", "libclang-dev"),
];

/// Install the Debian packages whose `sh` check fails, when we may, else say how.
pub fn ensure_packages<S: AsRef<str>>(checks: &[(S, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = checks
        .iter()
        .filter(|(check, _)| !holds(check.as_ref()))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let sudo = !is_root
        && Command::new("sudo")
            .args(["-n", "true"])
            .status()
            .is_ok_and(|s| s.success());
    if !is_root && !sudo {
        bail!(
            "missing system packages; install them with:\n  sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut cmd = if sudo {
            Command::new("sudo")
        } else {
            Command::new("apt-get")
        };
        if sudo {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)
}

/// Rustup components and targets, added when missing.
pub fn ensure_rustup(components: &[&str], targets: &[&str]) -> Result<()> {
    if !have("rustup") {
        return Ok(());
    }
    if !components.is_empty() {
        run(Command::new("rustup")
            .args(["component", "add"])
            .args(components))?;
    }
    if !targets.is_empty() {
        run(Command::new("rustup").args(["target", "add"]).args(targets))?;
    }
    Ok(())
}

/// The Debian packages the tests use: video (ffmpeg), a second broker (mosquitto) and
/// `systemd-analyze` for the unit files.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("ffmpeg", "ffmpeg"),
    ("ffprobe", "ffmpeg"),
    ("mosquitto", "mosquitto"),
    ("systemd-analyze", "systemd"),
];

#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Skip fmt and clippy (tests only).
    #[arg(long)]
    pub no_lint: bool,
    /// Extra arguments for the test runner (filters).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn test(args: &TestArgs) -> Result<()> {
    ensure_system(TEST_TOOLS)?;
    // The interop tests run against LeRobot itself: provision its venv (a no-op once built),
    // so that no test here passes by skipping for want of it.
    let env = setup::run(&SetupArgs {
        lerobot: true,
        ..SetupArgs::default()
    })?;
    if !args.no_lint {
        ensure_rustup(&["rustfmt", "clippy"], &[])?;
        run(cargo(&env).args(["fmt", "--all", "--", "--check"]))?;
        run(cargo(&env).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    no_libtorch_check(&env)?;
    // End-to-end tests start the real binaries, so build them all first. `--tests` gives this
    // build the feature set of the test build below (dev-dependencies unified in), so nextest
    // reuses every artifact instead of rebuilding torch and arrow a second time.
    run(cargo(&env).args(["build", "--workspace", "--bins", "--tests"]))?;
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = cargo(&env);
    // The binaries were just built with the workspace's features; end-to-end tests must not
    // rebuild them with a narrower feature set.
    cmd.env("ZK0_E2E_NO_BUILD", "1");
    if nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    run(cmd.args(&args.args))
}

/// The daemons and pure libraries must not need libtorch: their dependency graph has no
/// `torch-sys`. (`cargo xtask cross` builds exactly these packages for aarch64, where no
/// libtorch exists, with LIBTORCH unset: the build-level proof, without a second host build
/// here whose different feature set would make cargo rebuild half the workspace.)
fn no_libtorch_check(env: &Env) -> Result<()> {
    let out = cargo(env)
        .args(["tree", "-e", "normal,build", "--prefix", "none"])
        .args(NO_LIBTORCH_PACKAGES.iter().flat_map(|p| ["-p", p]))
        .output()
        .context("cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = tree
        .lines()
        .find(|l| l.starts_with("torch-sys") || l.starts_with("tch "))
    {
        bail!("a daemon or pure library depends on libtorch: {line}");
    }
    eprintln!(
        "ok: {} do not depend on libtorch",
        NO_LIBTORCH_PACKAGES.join(", ")
    );
    Ok(())
}

/// Packages that must build and run without libtorch.
pub const NO_LIBTORCH_PACKAGES: &[&str] = &[
    "edge-agent",
    "aggregator",
    "shared-proto",
    "lerobot-dataset",
    "zk0-daemon",
    "smolvla-config",
    "zk0-robot",
    "zk0-infer",
];

/// `cargo xtask demo [zk0-demo args]`: builds the four binaries in the dev profile
/// (dependencies at opt-level 2, tensor work in libtorch: on 2 cores the demo took 12 s with dev
/// binaries and 10 s with release ones, while building the release ones took 12 min) and runs
/// `zk0-demo` with the libtorch environment, in `target/zk0-demo/run-<unix time>` by default.
pub fn demo(args: &[String]) -> Result<()> {
    ensure_system(&[("ffmpeg", "ffmpeg"), ("ffprobe", "ffmpeg")])?;
    let env = setup::run(&SetupArgs::default())?;
    run(cargo(&env).args([
        "build",
        "-p",
        "aggregator",
        "-p",
        "edge-agent",
        "-p",
        "trainer",
        "-p",
        "zk0-e2e",
        "--bins",
    ]))?;
    let target = target_dir();
    let demo = target
        .join("debug")
        .join(format!("zk0-demo{}", std::env::consts::EXE_SUFFIX));
    let mut cmd = Command::new(demo);
    env.apply(&mut cmd);
    if !args
        .iter()
        .any(|a| a == "--dir" || a.starts_with("--dir=") || a == "-h" || a == "--help")
    {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        cmd.arg("--dir")
            .arg(target.join("zk0-demo").join(format!("run-{secs}")));
    }
    run(cmd.args(args))
}

/// Benchmarks: name → (package, bench target, description). Each prints its figures and the
/// ratio to a baseline measured in the same run.
const BENCHES: &[(&str, &str, &str, &str)] = &[
    (
        "federation",
        "shared-proto",
        "federation",
        "codec MB/s and ratios on a real zk0-train delta and a synthetic full-size one, \
         aggregation vs memcpy",
    ),
    (
        "dataset",
        "lerobot-dataset",
        "dataset",
        "frames/s, ours vs LeRobot",
    ),
    (
        "train",
        "trainer",
        "train",
        "training steps/s and RSS, zk0-train vs LeRobot",
    ),
    (
        "infer",
        "trainer",
        "infer",
        "per-chunk latency and peak RSS: ONNX Runtime (the export) vs tch eager vs LeRobot, \
         tiny and full size, 1 and all threads",
    ),
    (
        "aggregator",
        "zk0-e2e",
        "aggregator",
        "aggregator peak RSS vs clients; 100 MB via the broker vs raw TCP",
    ),
    (
        "agent",
        "zk0-e2e",
        "agent",
        "idle zk0-agent run (systemd-started, on a broker): RSS, start-up to READY=1, binary \
         size; x86_64 and (qemu) aarch64 (--aarch64 builds it first)",
    ),
];

/// Directory of a workspace package whose name differs from its folder.
fn package_dir(pkg: &str) -> &str {
    match pkg {
        "zk0-e2e" => "tests",
        other => other,
    }
}

pub fn bench(name: &str, args: &[String]) -> Result<()> {
    let known = |n: &str| BENCHES.iter().find(|b| b.0 == n);
    let Some(&(_, pkg, target, _)) = known(name) else {
        eprintln!("benchmarks:");
        for (n, _, _, what) in BENCHES {
            eprintln!("  {n:12} {what}");
        }
        if name == "list" {
            return Ok(());
        }
        bail!("no benchmark named {name:?}");
    };
    let bench_file = root()
        .join(package_dir(pkg))
        .join("benches")
        .join(format!("{target}.rs"));
    if !bench_file.is_file() {
        bail!(
            "benchmark {name:?} is not there yet ({} missing)",
            bench_file.display()
        );
    }
    let env = setup::run(&SetupArgs {
        lerobot: name == "infer",
        ..SetupArgs::default()
    })?;
    let mut args = args.to_vec();
    if name == "federation" {
        args = real_federation_delta(&env, args)?;
    }
    if name == "agent" && args.iter().any(|a| a == "--aarch64") {
        // The aarch64 release binaries the bench then measures under qemu.
        crate::cross::cross(&crate::cross::CrossArgs {
            release: true,
            no_run: true,
            daemons_only: true,
        })?;
    }
    if name == "infer" {
        // The ORT side runs the agent binary.
        run(cargo(&env).args(["build", "-p", "edge-agent"]))?;
    }
    let mut cmd = cargo(&env);
    cmd.args(["bench", "-p", pkg, "--bench", target]);
    if pkg == "lerobot-dataset" {
        // The reader as the trainer builds it: in-process decoding.
        cmd.args(["--features", "libav"]);
    }
    run(cmd.arg("--").args(&args))
}

/// Local steps of the real delta: the aggregator's default round (`[rounds]` local_steps 10,
/// batch_size 8, lr 1e-4, mu 0.01).
const REAL_DELTA_STEPS: usize = 10;

/// `bench federation`: makes a real fine-tuning delta for the bench and returns its arguments
/// with `--real-global/--real-trained/--real-label` added (`--real-steps N` is ours; 0 skips).
/// Runs the release `zk0-train` (the profile `bench train` measures) on the vendored tiny
/// SmolVLA (tests/fixtures/smolvla-tiny) and a synthetic dataset from `zk0-agent dataset synth`:
/// once with 0 steps (the trainable tensors as loaded: the global model) and once for N steps
/// from that same init; the bench computes `trained − global` as an agent does. Processes, not
/// linking: shared-proto stays free of libtorch.
fn real_federation_delta(env: &Env, args: Vec<String>) -> Result<Vec<String>> {
    let mut steps = REAL_DELTA_STEPS;
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--real-steps" {
            let v = it.next().context("--real-steps needs a value")?;
            steps = v.parse().with_context(|| format!("--real-steps {v:?}"))?;
        } else {
            rest.push(a);
        }
    }
    if steps == 0
        || rest
            .iter()
            .any(|a| a == "--real-global" || a == "-h" || a == "--help")
    {
        return Ok(rest);
    }
    ensure_system(&[("ffmpeg", "ffmpeg"), ("ffprobe", "ffmpeg")])?;
    run(cargo(env).args([
        "build",
        "--release",
        "-p",
        "trainer",
        "--bin",
        "zk0-train",
        "-p",
        "edge-agent",
        "--bin",
        "zk0-agent",
    ]))?;
    let target = target_dir();
    let bin = |n: &str| {
        target
            .join("release")
            .join(format!("{n}{}", std::env::consts::EXE_SUFFIX))
    };
    let dir = target.join("zk0-bench").join("federation");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let model = root().join("tests/fixtures/smolvla-tiny");
    let cameras = fixture_cameras(&model)?;
    let dataset = dir.join("dataset");
    let mut synth = Command::new(bin("zk0-agent"));
    synth
        .args(["dataset", "synth"])
        .arg(&dataset)
        .args(["--episodes", "2", "--frames", "40", "--vcodec", "libx264"])
        .args(["--seed", "1"]);
    for c in &cameras {
        synth.args(["--camera", c]);
    }
    run(&mut synth)?;
    let (batch, lr, mu) = (8, "1e-4", "0.01");
    let train = |steps: usize, out: &Path| -> Result<()> {
        let mut cmd = Command::new(bin("zk0-train"));
        env.apply(&mut cmd);
        cmd.args(["train", "--model"])
            .arg(&model)
            .arg("--tokenizer")
            .arg(model.join("pipeline/tokenizer.json"))
            .arg("--dataset")
            .arg(&dataset)
            .args([
                "--steps",
                &steps.to_string(),
                "--batch-size",
                &batch.to_string(),
            ])
            .args(["--lr", lr, "--mu", mu, "--seed", "0", "--device", "cpu"])
            .arg("--out-params")
            .arg(out)
            .arg("--out-metrics")
            .arg(out.with_extension("metrics.json"))
            .stdout(std::process::Stdio::null());
        run(&mut cmd)
    };
    let (global, trained) = (
        dir.join("global.safetensors"),
        dir.join("trained.safetensors"),
    );
    train(0, &global)?;
    train(steps, &trained)?;
    rest.extend([
        "--real-global".to_string(),
        global.display().to_string(),
        "--real-trained".into(),
        trained.display().to_string(),
        "--real-label".into(),
        format!(
            "release zk0-train train on tests/fixtures/smolvla-tiny (LeRobot SmolVLA at tiny \
             widths), {steps} steps × batch {batch}, lr {lr}, mu {mu}, seed 0, from the \
             fixture's weights; dataset: zk0-agent dataset synth, 2 episodes × 40 frames, {}",
            cameras.join(" ")
        ),
    ]);
    Ok(rest)
}

/// `NAME:WIDTHxHEIGHT` of each camera a LeRobot checkpoint's config.json declares (its
/// `VISUAL` input features, shape `[3, H, W]`), for `zk0-agent dataset synth --camera`.
fn fixture_cameras(model: &Path) -> Result<Vec<String>> {
    let path = model.join("config.json");
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let mut cams = Vec::new();
    for (key, f) in cfg["input_features"].as_object().into_iter().flatten() {
        if f["type"] != "VISUAL" {
            continue;
        }
        let name = key.strip_prefix("observation.images.").unwrap_or(key);
        let shape: Vec<u64> = f["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        if shape.len() != 3 {
            bail!("{}: {key} shape {shape:?} is not [3, H, W]", path.display());
        }
        cams.push(format!("{name}:{}x{}", shape[2], shape[1]));
    }
    if cams.is_empty() {
        bail!("{} declares no camera", path.display());
    }
    Ok(cams)
}

/// The fuzz targets: the `[[bin]]` names of fuzz/Cargo.toml.
pub fn fuzz_targets() -> Result<Vec<String>> {
    let path = root().join("fuzz/Cargo.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // The `name` of each `[[bin]]` table (cargo-fuzz's layout: one per target).
    let mut targets = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let Some(v) = line.strip_prefix("name").map(str::trim_start) {
            if let (true, Some(v)) = (in_bin, v.strip_prefix('=')) {
                targets.push(v.trim().trim_matches('"').to_string());
            }
        }
    }
    if targets.is_empty() {
        bail!("{} declares no fuzz target", path.display());
    }
    Ok(targets)
}

/// Runs each target for `seconds` (libFuzzer's `-max_total_time`), one after another; a crash
/// stops with libFuzzer's report (the input lands in fuzz/artifacts/<target>/).
pub fn fuzz(targets: &[String], seconds: u64) -> Result<()> {
    if !root().join("fuzz/Cargo.toml").is_file() {
        bail!("no fuzz/ directory");
    }
    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in targets {
        eprintln!("fuzzing {target} for {seconds} s");
        // cargo-fuzz needs nightly flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP.
        run(Command::new("cargo")
            .current_dir(root())
            .env("RUSTC_BOOTSTRAP", "1")
            .args([
                "fuzz",
                "run",
                target,
                "--",
                &format!("-max_total_time={seconds}"),
            ]))
        .with_context(|| format!("fuzz target {target}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fuzz_target_file_is_a_declared_target() {
        let mut declared = fuzz_targets().unwrap();
        declared.sort();
        let mut files: Vec<String> = std::fs::read_dir(root().join("fuzz/fuzz_targets"))
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                Some(p.file_stem()?.to_str()?.to_string())
            })
            .collect();
        files.sort();
        assert_eq!(declared, files);
    }
}
