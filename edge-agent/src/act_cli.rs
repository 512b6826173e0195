//! `zk0-agent act --model DIR`: the exported policy driving the follower arm (see [`crate::act`]
//! for the loop). The arm and cameras come from the agent config's `[robot]` section (`--sim`:
//! the in-process servo emulator, and a test-pattern camera for each of the export's cameras
//! the config lacks); the policy settings from its `[infer]` section, overridden by flags.
//! With `--follow-global` (`[infer] follow_global`) the policy is the newest export
//! `zk0-agent run` made of the federation's global model (`<work_dir>/exports/current.json`,
//! which then wins over `--model`), replaced between chunks by each newer one
//! ([`crate::act::follow`]).
//! SIGINT and SIGTERM end the tick under way, then the follower is disconnected as LeRobot's
//! `SOFollower.disconnect` does (torque off unless `disable_torque_on_disconnect` is false),
//! and the report (JSON) goes to stdout and `--report`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use zk0_infer::{ActionQueue, Aggregate, OnnxPolicy, Processor, Provider};
use zk0_robot::camera::Camera;
use zk0_robot::feetech::table;
use zk0_robot::{Bus, Role};

use crate::act::follow::{Follow, FollowStats, LoadFn};
use crate::act::worker::{ChunkSource, OnnxSource, SourceSettings, Worker};
use crate::act::{self, ActError, ActOptions};
use crate::federate::config::AgentConfig;
use crate::federate::export;
use crate::infer_cli::{fixed_noise, load_export};
use crate::record::config::{CameraConfig, RobotConfig};
use crate::record::Controls;
use crate::robot_cli::{stop_on_signals, RobotArgs};

/// The agent config's `[infer]` section: `act`'s defaults.
///
/// ```toml
/// [infer]
/// model = "/opt/zk0/export"          # zk0-train export-onnx output
/// task = "pick up the cube"
/// fps = 30
/// provider = "cpu"                   # cpu | cuda | tensorrt
/// threads = 4                        # ONNX Runtime intra-op threads (default: one per core)
/// chunk_size_threshold = 0.5         # request the next chunk at ≤ this × n_action_steps left
/// aggregate = "weighted_average"     # latest_only | weighted_average | average | conservative
/// dataset = ""                       # normalization stats (meta/stats.json) for an export
///                                    # without processor files
/// follow_global = false              # `zk0-agent run` exports each new verified global model
///                                    # to <work_dir>/exports/<model_id> (current.json names
///                                    # the newest); `act` then swaps it in between chunks
/// export_command = []                # the exporter (default: the worker's program with
///                                    # `export-onnx`, i.e. `zk0-train export-onnx`)
/// export_timeout_secs = 1800         # an export still running after this long is killed
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferConfig {
    pub model: PathBuf,
    pub tokenizer: PathBuf,
    pub dataset: PathBuf,
    pub task: String,
    pub fps: f64,
    pub provider: Provider,
    pub threads: Option<usize>,
    pub chunk_size_threshold: f64,
    pub aggregate: Aggregate,
    pub seed: u64,
    /// Export each new global model (`zk0-agent run`) and follow the newest (`act`).
    pub follow_global: bool,
    /// The exporter command (empty: the worker's program with `export-onnx`).
    pub export_command: Vec<String>,
    pub export_timeout_secs: u64,
}

impl Default for InferConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            tokenizer: PathBuf::new(),
            dataset: PathBuf::new(),
            task: String::new(),
            fps: 30.0,
            provider: Provider::Cpu,
            threads: None,
            chunk_size_threshold: 0.5,
            aggregate: Aggregate::WeightedAverage,
            seed: 0,
            follow_global: false,
            export_command: Vec::new(),
            export_timeout_secs: 1800,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ActArgs {
    #[command(flatten)]
    pub robot: RobotArgs,
    /// Export directory (`zk0-train export-onnx`); default: `[infer] model`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Run the newest export of the federation's global model (`<work_dir>/exports/
    /// current.json`, made by `zk0-agent run` with `[infer] follow_global`) and swap in each
    /// newer one between chunks.
    #[arg(long)]
    pub follow_global: bool,
    /// The task given to the policy.
    #[arg(long)]
    pub task: Option<String>,
    /// Control rate (default 30).
    #[arg(long)]
    pub fps: Option<f64>,
    /// Run time in seconds (default: until SIGINT or SIGTERM).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Execution provider: cpu, cuda or tensorrt.
    #[arg(long)]
    pub provider: Option<Provider>,
    /// ONNX Runtime intra-op threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Request the next chunk when at most this fraction of n_action_steps is left (0..1).
    #[arg(long)]
    pub chunk_size_threshold: Option<f64>,
    /// How overlapping actions merge: latest_only, weighted_average, average, conservative.
    #[arg(long)]
    pub aggregate: Option<Aggregate>,
    /// Largest move of a goal from the present position per tick (default: `[robot]`'s).
    #[arg(long)]
    pub max_relative_target: Option<f64>,
    /// LeRobot dataset whose meta/stats.json normalizes, for an export without processor files.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// tokenizer.json (default: the export's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// safetensors with a tensor `noise` [chunk_size, max_action_dim] used for every chunk.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Seed of the per-chunk noise when --noise is not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also write the report (JSON) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// libonnxruntime.so (default: $ORT_DYLIB_PATH, else the system's).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub onnxruntime: Option<PathBuf>,
}

impl ActArgs {
    /// `[infer]` with the flags over it, checked.
    fn settings(&self, mut c: InferConfig) -> Result<InferConfig> {
        fn set<T: Clone>(slot: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                slot.clone_from(v);
            }
        }
        set(&mut c.model, &self.model);
        set(&mut c.task, &self.task);
        set(&mut c.fps, &self.fps);
        set(&mut c.provider, &self.provider);
        set(&mut c.chunk_size_threshold, &self.chunk_size_threshold);
        set(&mut c.aggregate, &self.aggregate);
        set(&mut c.dataset, &self.dataset);
        set(&mut c.tokenizer, &self.tokenizer);
        set(&mut c.seed, &self.seed);
        if self.threads.is_some() {
            c.threads = self.threads;
        }
        c.follow_global |= self.follow_global;
        if c.model.as_os_str().is_empty() && !c.follow_global {
            bail!("no model: pass --model DIR, set [infer] model, or --follow-global");
        }
        if c.task.trim().is_empty() {
            bail!("no task: pass --task or set [infer] task");
        }
        if let Some(s) = self.seconds {
            anyhow::ensure!(
                s.is_finite() && s > 0.0,
                "--seconds must be positive, got {s}"
            );
        }
        Ok(c)
    }
}

/// The cameras in the export's order (`observation.images.<name>`); with `sim`, a test
/// pattern of `size` (the export's input: nothing to resize) for each one the config lacks.
fn export_cameras(
    robot: &RobotConfig,
    keys: &[String],
    sim: bool,
    fps: f64,
    (width, height): (u32, u32),
) -> Result<Vec<CameraConfig>> {
    keys.iter()
        .map(|key| {
            let name = key.strip_prefix("observation.images.").unwrap_or(key);
            match robot.cameras.iter().find(|c| c.name == name) {
                Some(c) => Ok(c.clone()),
                None if sim => Ok(CameraConfig {
                    name: name.to_string(),
                    fps,
                    width,
                    height,
                    ..CameraConfig::default()
                }),
                None => bail!(
                    "the export needs camera {key}: add a [[robot.cameras]] named {name:?} (have {:?})",
                    robot.cameras.iter().map(|c| &c.name).collect::<Vec<_>>()
                ),
            }
        })
        .collect()
}

/// Torque_Enable of every motor, read back over the bus the arm gave back.
fn torque_after<T: zk0_robot::Transport>(transport: T, robot: &RobotConfig) -> Result<Vec<i64>> {
    let mut bus = Bus::new(transport, Default::default());
    bus.config_mut().base_timeout = Duration::from_millis(robot.bus_timeout_ms);
    Ok(bus.sync_read(&table::TORQUE_ENABLE, &[1, 2, 3, 4, 5, 6])?)
}

/// What a loop built from `p`'s export needs of every export swapped in after it.
fn loop_shape(p: &OnnxPolicy) -> String {
    let m = &p.manifest;
    let cameras: Vec<&str> = m.cameras.iter().map(|c| c.key.as_str()).collect();
    format!(
        "cameras {cameras:?} at {}x{}, state {}, action {}, chunk {}x{}, n_action_steps {}",
        m.image.width,
        m.image.height,
        m.state_dim,
        m.action_dim,
        m.chunk_size,
        m.max_action_dim,
        m.n_action_steps
    )
}

/// With `follow_global`: the export `current.json` names, if any (its dir replaces the
/// model), and the model id.
fn start_export(inf: &mut InferConfig, exports: &Path) -> Result<Option<String>> {
    if !inf.follow_global {
        return Ok(None);
    }
    match export::read_current(exports)? {
        Some(c) => {
            inf.model = c.dir;
            Ok(Some(c.model_id))
        }
        None if inf.model.as_os_str().is_empty() => bail!(
            "--follow-global: no export yet in {} (`zk0-agent run` with [infer] follow_global makes one per round); or pass --model",
            exports.display()
        ),
        None => Ok(None),
    }
}

/// `zk0-agent act`: the settings, the export, the loop's parts; the run; the report.
pub fn run(args: ActArgs) -> Result<()> {
    let cfg = AgentConfig::load(args.robot.config.as_deref())?;
    let mut inf = args.settings(cfg.infer)?;
    let exports = export::exports_dir(&cfg.work_dir);
    let model_id = start_export(&mut inf, &exports)?;
    let (mut robot, max_relative_target) = robot_section(&args, cfg.robot)?;

    let (source, settings) = open_source(&args, &inf)?;
    let m = &source.policy.manifest;
    let keys: Vec<String> = m.cameras.iter().map(|c| c.key.clone()).collect();
    let size = (m.image.width as u32, m.image.height as u32);
    robot.cameras = export_cameras(&robot, &keys, args.robot.sim, inf.fps, size)?;
    let follow = inf
        .follow_global
        .then(|| follow_exports(&exports, model_id, settings, loop_shape(&source.policy)));
    let follow_stats = follow.as_ref().map(Follow::stats);
    let mut queue = ActionQueue::new(source.keep, inf.chunk_size_threshold, inf.aggregate)?;
    let act_opts = ActOptions {
        fps: inf.fps,
        seconds: args.seconds,
        max_relative_target,
        ..ActOptions::default()
    };

    let ran = drive(&robot, source, follow, &mut queue, &act_opts, &inf)?;

    let followed = follow_stats.map_or(FollowStats::default(), |s| {
        s.lock().unwrap_or_else(|e| e.into_inner()).clone()
    });
    let report = act_report(&ran, &inf, &followed, &queue, max_relative_target);
    println!("{report}");
    if let Some(p) = &args.report {
        write_report(p, &report)?;
    }
    ran.result?;
    if let Some(d) = ran.disconnect {
        bail!(d);
    }
    Ok(())
}

/// `[robot]` with the flags over it, and `max_relative_target` taken out of it: the loop
/// clamps against the positions it has just read (no second read per tick), not the arm.
fn robot_section(args: &ActArgs, section: RobotConfig) -> Result<(RobotConfig, Option<f64>)> {
    let mut robot = args.robot.section(section)?;
    if let Some(c) = args.max_relative_target {
        anyhow::ensure!(
            c.is_finite() && c > 0.0,
            "--max-relative-target must be positive, got {c}"
        );
        robot.max_relative_target = Some(c);
    }
    let max_relative_target = robot.max_relative_target.take();
    Ok((robot, max_relative_target))
}

/// The export as the worker's chunk source (checked for an SO arm's 6 joints), and the
/// settings that open each export followed after it the same way.
fn open_source(args: &ActArgs, inf: &InferConfig) -> Result<(OnnxSource, SourceSettings)> {
    let loaded = load_export(
        args.onnxruntime.as_deref(),
        &inf.model,
        inf.provider,
        inf.threads,
    )?;
    let (policy, opts) = (loaded.policy, loaded.opts);
    let m = &policy.manifest;
    anyhow::ensure!(
        m.action_dim == 6 && m.state_dim == 6,
        "the export has state {} and action {}: an SO arm needs 6 and 6",
        m.state_dim,
        m.action_dim
    );
    let stats = if inf.dataset.as_os_str().is_empty() {
        None
    } else {
        let ds = lerobot_dataset::LeRobotDataset::open(&inf.dataset)
            .with_context(|| format!("--dataset {}", inf.dataset.display()))?;
        ds.stats().cloned()
    };
    let tokenizer = (!inf.tokenizer.as_os_str().is_empty()).then_some(inf.tokenizer.as_path());
    let processor = Processor::new(&inf.model, m, stats.as_ref(), tokenizer)?;
    let noise = fixed_noise(args.noise.as_deref(), &policy)?;
    let settings = SourceSettings {
        runtime: opts,
        stats,
        tokenizer: tokenizer.map(Path::to_path_buf),
        task: inf.task.clone(),
        noise: noise.clone(),
        seed: inf.seed,
    };
    let source = OnnxSource::new(policy, processor, inf.task.clone(), noise, inf.seed);
    Ok((source, settings))
}

/// `--follow-global`: watches `exports` for newer global models and opens each with
/// `settings`, refusing one whose [`loop_shape`] differs from the running loop's `shape`.
fn follow_exports(
    exports: &Path,
    model_id: Option<String>,
    settings: SourceSettings,
    shape: String,
) -> Follow {
    let load: Arc<LoadFn> = Arc::new(move |dir: &Path| {
        let s = OnnxSource::open(dir, &settings).map_err(|e| e.to_string())?;
        let new = loop_shape(&s.policy);
        if new != shape {
            return Err(format!("it has {new}; the running loop has {shape}"));
        }
        Ok(Box::new(s) as Box<dyn ChunkSource>)
    });
    Follow::new(exports, model_id, load)
}

/// How a run ended: the loop's summary and outcome, and what disconnecting left.
struct Ran {
    summary: act::ActSummary,
    exit: act::ExitReason,
    result: Result<(), ActError>,
    /// Torque_Enable of each motor after the disconnect, if it could be read back.
    torque: Option<Vec<i64>>,
    disconnect: Option<String>,
}

/// Starts the worker, the cameras and the follower, runs the loop until a signal, the time
/// or an error, then disconnects the follower (torque off) and stops the rest.
fn drive(
    robot: &RobotConfig,
    source: OnnxSource,
    follow: Option<Follow>,
    queue: &mut ActionQueue,
    act_opts: &ActOptions,
    inf: &InferConfig,
) -> Result<Ran> {
    let controls = Arc::new(Controls::default());
    stop_on_signals(Arc::clone(&controls))?;
    // The follower last: nothing that can fail stands between its torque going on and the
    // loop whose end turns it off.
    let worker = Worker::spawn_following(Box::new(source), follow)
        .context("starting the inference thread")?;
    let cameras: Vec<Camera> = robot.start_cameras()?;
    let mut follower = robot.connect_arm(Role::Follower)?;
    tracing::info!(model = %inf.model.display(), fps = inf.fps, task = %inf.task, "acting");
    let parts = act::Parts {
        follower: &mut follower,
        cameras: &cameras,
        worker: &worker,
        queue,
    };
    let (summary, exit, result) = act::act(parts, act_opts, &controls.stop);
    // Torque off first; then wait for the chunk under way, if any.
    let (torque, disconnect) = match follower.disconnect() {
        Ok(t) => (torque_after(t, robot).ok(), None),
        Err(e) => (None, Some(format!("disconnecting the follower: {e}"))),
    };
    drop(worker);
    drop(cameras);
    Ok(Ran {
        summary,
        exit,
        result,
        torque,
        disconnect,
    })
}

/// The report (JSON): the loop's summary, the disconnect, the model followed and the settings
/// the run used.
fn act_report(
    ran: &Ran,
    inf: &InferConfig,
    followed: &FollowStats,
    queue: &ActionQueue,
    max_relative_target: Option<f64>,
) -> serde_json::Value {
    let error = ran.result.as_ref().err().map(ActError::to_string);
    let mut report = ran.summary.report(inf.fps, ran.exit, error);
    report["disconnect_error"] = serde_json::json!(ran.disconnect);
    report["torque_after_disconnect"] = serde_json::json!(ran.torque);
    report["model"] = serde_json::json!(inf.model);
    report["follow_global"] = serde_json::json!(inf.follow_global);
    report["model_id"] = serde_json::json!(followed.model_id);
    report["model_swaps"] = serde_json::json!(followed.model_swaps);
    report["swap_failures"] = serde_json::json!(followed.swap_failures);
    report["n_action_steps"] = serde_json::json!(queue.n_action_steps());
    report["chunk_size_threshold"] = serde_json::json!(inf.chunk_size_threshold);
    report["aggregate"] = serde_json::json!(inf.aggregate);
    report["max_relative_target"] = serde_json::json!(max_relative_target);
    report
}

fn write_report(path: &Path, report: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{report:#}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("--report {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_section_parses_and_flags_override_it() {
        let cfg: AgentConfig = toml::from_str(
            "[infer]\nmodel = \"/m\"\ntask = \"pick\"\nfps = 20\naggregate = \"conservative\"\nprovider = \"cuda\"\n",
        )
        .unwrap();
        assert_eq!(cfg.infer.aggregate, Aggregate::Conservative);
        assert_eq!(cfg.infer.provider, Provider::Cuda);
        let args = <crate::act_cli::tests::Cli as clap::Parser>::parse_from([
            "x",
            "--fps",
            "40",
            "--aggregate",
            "latest_only",
            "--threads",
            "2",
        ])
        .a;
        let s = args.settings(cfg.infer.clone()).unwrap();
        assert_eq!(
            (s.fps, s.threads, s.aggregate),
            (40.0, Some(2), Aggregate::LatestOnly)
        );
        assert_eq!(s.model, PathBuf::from("/m"));
        assert_eq!(s.chunk_size_threshold, 0.5);
        let e = args
            .settings(InferConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--model"), "{e}");
        assert!(toml::from_str::<AgentConfig>("[infer]\nmodle = 1\n").is_err());
    }

    #[test]
    fn follow_global_starts_from_current_json_and_needs_an_export_or_a_model() {
        assert!(!InferConfig::default().follow_global, "off by default");
        let t = tempfile::tempdir().unwrap();
        let ex = export::exports_dir(t.path());
        let args = <Cli as clap::Parser>::parse_from(["x", "--follow-global", "--task", "t"]).a;
        let mut s = args.settings(InferConfig::default()).unwrap();
        assert!(s.follow_global, "no --model needed");
        let e = start_export(&mut s, &ex).unwrap_err().to_string();
        assert!(e.contains("no export yet"), "{e}");
        std::fs::create_dir_all(ex.join("m1.tmp")).unwrap();
        export::install(&ex, "m1", 4).unwrap();
        assert_eq!(start_export(&mut s, &ex).unwrap().as_deref(), Some("m1"));
        assert_eq!(s.model, std::path::absolute(ex.join("m1")).unwrap());
        // Not following: the pointer is not looked at.
        s.follow_global = false;
        s.model = "/m".into();
        assert_eq!(start_export(&mut s, &ex).unwrap(), None);
        assert_eq!(s.model, PathBuf::from("/m"));
    }

    #[test]
    fn sim_fills_in_the_exports_cameras_and_hardware_needs_them_configured() {
        let keys = vec!["observation.images.front".to_string()];
        let r = RobotConfig::default();
        let c = export_cameras(&r, &keys, true, 30.0, (64, 48)).unwrap();
        assert_eq!(
            (c[0].name.as_str(), c[0].width, c[0].height),
            ("front", 64, 48)
        );
        let e = export_cameras(&r, &keys, false, 30.0, (64, 48))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[[robot.cameras]]"), "{e}");
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: ActArgs,
    }
}
