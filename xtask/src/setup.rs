//! `cargo xtask setup` / `cargo xtask env`: libtorch, onnxruntime and the LeRobot venv.
//!
//! Resolution order for each component: the user's own (`LIBTORCH`, `ORT_DYLIB_PATH`), then
//! our cache, then (libtorch) an installed Python torch of the version tch needs or
//! (onnxruntime) a system library, and only then a download of the PyPI wheels with pip.
//! A cache hit touches no network, so a second `setup` finishes in well under a second.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The libtorch version `tch` 0.26 is built against.
pub const TORCH_VERSION: &str = "2.13.0";
/// The onnxruntime wheel fetched when none is found (the C API is backward compatible).
pub const ORT_VERSION: &str = "1.32.0";
/// LeRobot release the interop tests and benchmarks compare against.
pub const LEROBOT_VERSION: &str = "0.6.1";

const UNPACK_SCRIPT: &str = include_str!("unpack_wheels.py");

#[derive(clap::Args, Debug, Default)]
pub struct SetupArgs {
    /// Use a CUDA-capable libtorch (default when an NVIDIA GPU is detected).
    #[arg(long)]
    pub cuda: bool,
    /// Use the lean CPU libtorch even when a GPU is present.
    #[arg(long, conflicts_with = "cuda")]
    pub cpu: bool,
    /// Also build LeRobot's Python venv (for interop tests and benchmarks; ~5 GB).
    #[arg(long)]
    pub lerobot: bool,
}

/// Where everything lives: `ZK0_CACHE_DIR`, else `<user cache dir>/zk0`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ZK0_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(|| std::env::temp_dir().join("cache"))
        .join("zk0")
}

/// The resolved environment, saved by `setup` as `<cache>/env.json`.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub libtorch: Option<PathBuf>,
    pub ort_dylib: Option<PathBuf>,
    pub lerobot_python: Option<PathBuf>,
}

impl Env {
    fn file() -> PathBuf {
        cache_dir().join("env.json")
    }

    /// The saved environment, overridden by variables the user set.
    pub fn load() -> Result<Self> {
        let mut env = Env::default();
        if let Ok(text) = std::fs::read_to_string(Self::file()) {
            let v: serde_json::Value = serde_json::from_str(&text).context("parsing env.json")?;
            let path = |k: &str| v.get(k).and_then(|p| p.as_str()).map(PathBuf::from);
            env.libtorch = path("libtorch").filter(|p| libtorch_ok(p));
            env.ort_dylib = path("ort_dylib").filter(|p| p.is_file());
            env.lerobot_python = path("lerobot_python").filter(|p| p.is_file());
        }
        if let Some(p) = var_path("LIBTORCH") {
            env.libtorch = Some(p);
        }
        if let Some(p) = var_path("ORT_DYLIB_PATH") {
            env.ort_dylib = Some(p);
        }
        if let Some(p) = var_path("ZK0_LEROBOT_PYTHON") {
            env.lerobot_python = Some(p);
        }
        if env.libtorch.is_none() && env.ort_dylib.is_none() {
            bail!("no libtorch or onnxruntime configured: run `cargo xtask setup` first");
        }
        Ok(env)
    }

    fn save(&self) -> Result<()> {
        let s = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let v = serde_json::json!({
            "libtorch": s(&self.libtorch),
            "ort_dylib": s(&self.ort_dylib),
            "lerobot_python": s(&self.lerobot_python),
        });
        let file = Self::file();
        std::fs::create_dir_all(file.parent().unwrap())?;
        let tmp = file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&v)?)?;
        std::fs::rename(&tmp, &file)?;
        Ok(())
    }

    /// `(name, value)` pairs for child processes.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut vars = Vec::new();
        if let Some(lt) = &self.libtorch {
            vars.push(("LIBTORCH".into(), lt.display().to_string()));
            let mut ld = lt.join("lib").display().to_string();
            if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
                if !old.is_empty() && !old.split(':').any(|p| p == ld) {
                    ld = format!("{ld}:{old}");
                }
            }
            vars.push(("LD_LIBRARY_PATH".into(), ld));
        }
        if let Some(ort) = &self.ort_dylib {
            vars.push(("ORT_DYLIB_PATH".into(), ort.display().to_string()));
        }
        if let Some(py) = &self.lerobot_python {
            vars.push(("ZK0_LEROBOT_PYTHON".into(), py.display().to_string()));
        }
        vars
    }

    /// Shell `export` lines; LD_LIBRARY_PATH keeps whatever the shell already has.
    pub fn shell_exports(&self) -> String {
        let mut out = String::new();
        for (k, v) in self.vars() {
            if k == "LD_LIBRARY_PATH" {
                let lib = self.libtorch.as_ref().unwrap().join("lib");
                out += &format!(
                    "export {k}='{}'${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\n",
                    lib.display()
                );
            } else {
                out += &format!("export {k}='{v}'\n");
            }
        }
        out
    }

    /// Set this environment on a command.
    pub fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.envs(self.vars())
    }
}

/// `<dir>.tmp`: where a component is assembled before the atomic rename into place.
fn tmp_sibling(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    dir.with_file_name(name)
}

fn var_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn libtorch_ok(dir: &Path) -> bool {
    dir.join("lib/libtorch_cpu.so").is_file() && dir.join("include").is_dir()
}

fn libtorch_version(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("build-version"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn nvidia_gpu_present() -> bool {
    Path::new("/proc/driver/nvidia/version").exists()
        || Command::new("nvidia-smi")
            .arg("-L")
            .output()
            .map(|o| o.status.success() && !o.stdout.is_empty())
            .unwrap_or(false)
}

pub fn run(args: &SetupArgs) -> Result<Env> {
    let t0 = Instant::now();
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let cuda = args.cuda || (!args.cpu && nvidia_gpu_present());
    // Before any build: without them the trainer's build stops deep in ffmpeg-sys-next.
    crate::tasks::ensure_packages(crate::tasks::LIBAV_BUILD)?;

    let (libtorch, lt_how) = find_or_fetch_libtorch(&cache, cuda)?;
    eprintln!(
        "libtorch     {} ({lt_how}, version {})",
        libtorch.display(),
        libtorch_version(&libtorch).unwrap_or_else(|| "unknown".into())
    );
    let (ort, ort_how) = find_or_fetch_ort(&cache)?;
    eprintln!("onnxruntime  {} ({ort_how})", ort.display());

    let mut env = Env {
        libtorch: Some(libtorch),
        ort_dylib: Some(ort),
        lerobot_python: None,
    };
    let venv = cache.join(format!("lerobot-{LEROBOT_VERSION}"));
    if args.lerobot {
        let (py, how) = find_or_build_lerobot(&venv)?;
        eprintln!("lerobot venv {} ({how})", py.display());
        env.lerobot_python = Some(py);
    } else if venv.join(".complete").exists() {
        env.lerobot_python = Some(venv.join("bin/python"));
    }
    env.save()?;
    eprintln!(
        "setup done in {:.2} s; cache {}\nfor a shell: eval \"$(cargo xtask env)\"",
        t0.elapsed().as_secs_f64(),
        cache.display()
    );
    Ok(env)
}

fn find_or_fetch_libtorch(cache: &Path, cuda: bool) -> Result<(PathBuf, &'static str)> {
    if let Some(dir) = var_path("LIBTORCH") {
        if !libtorch_ok(&dir) {
            bail!(
                "LIBTORCH={} has no lib/libtorch_cpu.so and include/",
                dir.display()
            );
        }
        return Ok((dir, "from LIBTORCH"));
    }
    let flavour = if cuda { "cuda" } else { "cpu" };
    let dir = cache.join(format!("libtorch-{TORCH_VERSION}-{flavour}"));
    if libtorch_ok(&dir) {
        return Ok((dir, "cached"));
    }
    if let Some(dir) = python_torch(cuda) {
        return Ok((dir, "installed Python torch"));
    }
    eprintln!("fetching torch=={TORCH_VERSION} ({flavour}) from PyPI with pip ...");
    let dl = cache.join("downloads").join(format!("torch-{flavour}"));
    fetch_libtorch_wheels(&dir, &dl, cuda, &[])?;
    Ok((dir, "fetched"))
}

/// Downloads the torch wheel (for `platform_args`' platform, default this one) into `dl` and
/// assembles a LIBTORCH dir from it in `dir` (atomically); the wheels are deleted after.
fn fetch_libtorch_wheels(dir: &Path, dl: &Path, cuda: bool, platform_args: &[&str]) -> Result<()> {
    let mut pkgs = vec![format!("torch=={TORCH_VERSION}")];
    if !cuda {
        // The CPU path still has DT_NEEDED entries for these two CUDA libraries.
        pkgs.push("nvidia-cuda-runtime==13.0.*".into());
        pkgs.push("nvidia-cuda-cupti==13.0.*".into());
    }
    pip_download(dl, &pkgs, !cuda, platform_args)?;
    let tmp = tmp_sibling(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    let mut unpack = vec![
        "libtorch".to_string(),
        dl.display().to_string(),
        tmp.display().to_string(),
    ];
    if cuda {
        unpack.push("--cuda".into());
    }
    run_python_script(&unpack)?;
    std::fs::write(tmp.join("build-version"), format!("{TORCH_VERSION}\n"))?;
    std::fs::rename(&tmp, dir)?;
    let _ = std::fs::remove_dir_all(dl);
    Ok(())
}

/// pip arguments selecting the wheels of a Jetson-class aarch64 Linux (JetPack 6: glibc
/// 2.35). pip matches `--platform` tags exactly, so each manylinux tag the wheels use is named.
const AARCH64_WHEELS: &[&str] = &[
    "--only-binary=:all:",
    "--python-version",
    "3.11",
    "--platform",
    "manylinux_2_28_aarch64",
    "--platform",
    "manylinux_2_25_aarch64",
    "--platform",
    "manylinux_2_17_aarch64",
];

/// The aarch64 CPU libtorch of the same PyPI release (the manylinux_2_28 torch wheel, assembled
/// as the host's), for building `zk0-train` for the robot and running it under qemu-aarch64
/// (`cargo xtask cross`); cached beside the host's.
pub fn libtorch_aarch64() -> Result<PathBuf> {
    let cache = cache_dir();
    let dir = cache.join(format!("libtorch-{TORCH_VERSION}-cpu-aarch64"));
    if libtorch_ok(&dir) {
        return Ok(dir);
    }
    eprintln!("fetching the aarch64 torch=={TORCH_VERSION} wheel from PyPI with pip ...");
    let dl = cache.join("downloads").join("torch-cpu-aarch64");
    fetch_libtorch_wheels(&dir, &dl, false, AARCH64_WHEELS)?;
    Ok(dir)
}

/// A pip-installed torch of the right version is a complete LIBTORCH dir.
fn python_torch(cuda: bool) -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import torch,os;print(torch.__version__);print(os.path.dirname(torch.__file__));print(torch.version.cuda)"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let version = lines.next()?;
    let dir = PathBuf::from(lines.next()?);
    let has_cuda = lines.next().is_some_and(|c| c != "None");
    (version.split('+').next() == Some(TORCH_VERSION) && libtorch_ok(&dir) && (has_cuda || !cuda))
        .then_some(dir)
}

fn find_or_fetch_ort(cache: &Path) -> Result<(PathBuf, &'static str)> {
    if let Some(p) = var_path("ORT_DYLIB_PATH") {
        if !p.is_file() {
            bail!("ORT_DYLIB_PATH={} does not exist", p.display());
        }
        return Ok((p, "from ORT_DYLIB_PATH"));
    }
    let dir = cache.join(format!("onnxruntime-{ORT_VERSION}"));
    if let Some(p) = find_lib_in(&dir) {
        return Ok((p, "cached"));
    }
    for sys in [
        "/usr/local/lib",
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
    ] {
        if let Some(p) = find_lib_in(Path::new(sys)) {
            return Ok((p, "system"));
        }
    }
    eprintln!("fetching onnxruntime=={ORT_VERSION} from PyPI with pip ...");
    fetch_ort_wheel(&dir, &cache.join("downloads").join("onnxruntime"), &[]).map(|p| (p, "fetched"))
}

/// Downloads the onnxruntime wheel (for `platform_args`' platform, default this one) into
/// `dl`, unpacks its library into `dir` (atomically) and returns the library's path.
fn fetch_ort_wheel(dir: &Path, dl: &Path, platform_args: &[&str]) -> Result<PathBuf> {
    pip_download(
        dl,
        &[format!("onnxruntime=={ORT_VERSION}")],
        true,
        platform_args,
    )?;
    let tmp = tmp_sibling(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    run_python_script(&[
        "onnxruntime".into(),
        dl.display().to_string(),
        tmp.display().to_string(),
    ])?;
    std::fs::rename(&tmp, dir)?;
    let _ = std::fs::remove_dir_all(dl);
    find_lib_in(dir).context("onnxruntime wheel unpacked but no libonnxruntime.so found")
}

/// The aarch64 `libonnxruntime.so` of the same PyPI release (manylinux_2_28 wheel), for
/// running the robot binaries under qemu-aarch64 (`cargo xtask cross`); cached beside the
/// host's.
pub fn onnxruntime_aarch64() -> Result<PathBuf> {
    let cache = cache_dir();
    let dir = cache.join(format!("onnxruntime-{ORT_VERSION}-aarch64"));
    if let Some(p) = find_lib_in(&dir) {
        return Ok(p);
    }
    eprintln!("fetching the aarch64 onnxruntime=={ORT_VERSION} wheel from PyPI with pip ...");
    fetch_ort_wheel(
        &dir,
        &cache.join("downloads").join("onnxruntime-aarch64"),
        AARCH64_WHEELS,
    )
}

fn find_lib_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                && p.is_file()
        })
        .collect();
    // Prefer the fully versioned name (libonnxruntime.so.1.32.0) over symlinks.
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.into_iter().next()
}

fn pip_download(dest: &Path, pkgs: &[String], no_deps: bool, extra: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        // The wheels are unpacked into our own cache dir; pip's cache would keep a second
        // copy (gigabytes) outside it.
        "--no-cache-dir",
        "--progress-bar",
        "on",
        "-d",
    ])
    .arg(dest);
    if no_deps {
        cmd.arg("--no-deps");
    }
    cmd.args(extra).args(pkgs);
    let status = cmd
        .status()
        .context("running python3 -m pip (is Python with pip installed?)")?;
    if !status.success() {
        bail!("pip download {} failed ({status})", pkgs.join(" "));
    }
    Ok(())
}

fn run_python_script(args: &[String]) -> Result<()> {
    let status = Command::new("python3")
        .arg("-c")
        .arg(UNPACK_SCRIPT)
        .args(args)
        .status()
        .context("running python3")?;
    if !status.success() {
        bail!("unpacking wheels failed ({status})");
    }
    Ok(())
}

/// Python ≥ 3.12 for lerobot: on PATH, or under pyenv.
fn python312() -> Option<PathBuf> {
    for name in ["python3.12", "python3.13"] {
        if let Ok(out) = Command::new(name).arg("--version").output() {
            if out.status.success() {
                return Some(PathBuf::from(name));
            }
        }
    }
    let root = var_path("PYENV_ROOT").or_else(|| dirs::home_dir().map(|h| h.join(".pyenv")))?;
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("3.12") || n.starts_with("3.13"))
        })
        .collect();
    versions.sort();
    versions
        .into_iter()
        .map(|v| v.join("bin/python3"))
        .find(|p| p.is_file())
}

fn find_or_build_lerobot(venv: &Path) -> Result<(PathBuf, &'static str)> {
    let py = venv.join("bin/python");
    if venv.join(".complete").exists() && py.is_file() {
        // Venvs built before the export checks need the ONNX checkers added.
        if !python_imports(&py, "onnx, onnxruntime") {
            pip_install(&py, &onnx_checkers())?;
        }
        return Ok((py, "cached"));
    }
    let base = python312().context("lerobot needs Python >= 3.12 (python3.12 on PATH or pyenv)")?;
    eprintln!(
        "building LeRobot {LEROBOT_VERSION} venv with {} (a few minutes, ~5 GB) ...",
        base.display()
    );
    let _ = std::fs::remove_dir_all(venv);
    let ok = Command::new(&base)
        .args(["-m", "venv"])
        .arg(venv)
        .status()?
        .success();
    if !ok {
        bail!("creating the venv at {} failed", venv.display());
    }
    pip_install(
        &py,
        &[format!(
            "lerobot[smolvla,dataset,feetech]=={LEROBOT_VERSION}"
        )],
    )?;
    // Separately, as on a venv built before the checkers were added.
    pip_install(&py, &onnx_checkers())?;
    std::fs::write(venv.join(".complete"), LEROBOT_VERSION)?;
    Ok((py, "built"))
}

/// The independent checkers of exported graphs, installed in the LeRobot venv: `onnx`
/// (`checker.check_model(full_check=True)`) and the stock Python onnxruntime.
fn onnx_checkers() -> Vec<String> {
    vec![
        format!("onnx=={ONNX_VERSION}"),
        format!("onnxruntime=={ORT_VERSION}"),
    ]
}

/// The PyPI `onnx` the export is checked with.
const ONNX_VERSION: &str = "1.23.2";

fn python_imports(py: &Path, modules: &str) -> bool {
    Command::new(py)
        .args(["-c", &format!("import {modules}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn pip_install(py: &Path, pkgs: &[String]) -> Result<()> {
    eprintln!("installing {} into {} ...", pkgs.join(" "), py.display());
    let ok = Command::new(py)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-cache-dir",
            "--progress-bar",
            "on",
        ])
        .args(pkgs)
        .status()?
        .success();
    if !ok {
        bail!("pip install {} failed", pkgs.join(" "));
    }
    Ok(())
}
