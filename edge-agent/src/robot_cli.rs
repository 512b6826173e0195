//! `zk0-agent record | teleop | calibrate`: the robot commands over [`crate::record`], with the
//! arms, cameras and calibration directory from the agent config's `[robot]` section (`--sim`
//! puts both arms on the in-process servo emulator). SIGINT and SIGTERM stop at the next tick:
//! the episode under way is discarded, every saved one is kept. LeRobot's recording keys are
//! lines on stdin: `n` (→), `r` (←), `q` (Esc).

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use lerobot_dataset::DatasetWriter;
use zk0_robot::calibrate::{Calibrator, Event, Prompt};
use zk0_robot::control::Clock;
use zk0_robot::Role;

use crate::federate::config::AgentConfig;
use crate::record::config::{role_name, RobotConfig};
use crate::record::{self, Controls, Progress, RecordOptions};

/// The robot section to use.
#[derive(clap::Args, Debug)]
pub struct RobotArgs {
    /// Agent config file (TOML) with a `[robot]` section.
    #[arg(long, short, env = "ZK0_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Both arms on the in-process servo emulator (no hardware needed).
    #[arg(long)]
    pub sim: bool,
}

impl RobotArgs {
    fn robot(&self) -> Result<RobotConfig> {
        self.section(AgentConfig::load(self.config.as_deref())?.robot)
    }

    /// The config's `[robot]` section, on the emulator with `--sim`, validated.
    pub(crate) fn section(&self, robot: RobotConfig) -> Result<RobotConfig> {
        let robot = if self.sim { robot.simulated() } else { robot };
        robot.validate()?;
        Ok(robot)
    }
}

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    #[command(flatten)]
    pub robot: RobotArgs,
    /// Dataset directory (default: `$HF_LEROBOT_HOME/<repo-id>`, as LeRobot).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// `owner/name`, as LeRobot's `--dataset.repo_id`.
    #[arg(long)]
    pub repo_id: String,
    /// The task every frame is labelled with (`--dataset.single_task`).
    #[arg(long)]
    pub task: String,
    #[arg(long, default_value_t = 50)]
    pub episodes: usize,
    #[arg(long, default_value_t = 60.0)]
    pub episode_time_s: f64,
    #[arg(long, default_value_t = 60.0)]
    pub reset_time_s: f64,
    #[arg(long, default_value_t = 30)]
    pub fps: u32,
}

#[derive(clap::Args, Debug)]
pub struct TeleopArgs {
    #[command(flatten)]
    pub robot: RobotArgs,
    #[arg(long, default_value_t = 60.0)]
    pub fps: f64,
    /// Stop after this long (default: until Ctrl-C or SIGTERM).
    #[arg(long)]
    pub time_s: Option<f64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArmArg {
    Follower,
    Leader,
}

#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub robot: RobotArgs,
    #[arg(long, value_enum)]
    pub arm: ArmArg,
    /// Override the arm's port from the config.
    #[arg(long)]
    pub port: Option<String>,
    /// Override the arm's id (the calibration file's name).
    #[arg(long)]
    pub id: Option<String>,
}

/// Raises `controls.stop` on the first SIGINT or SIGTERM (handlers installed before this
/// returns).
pub fn stop_on_signals(controls: Arc<Controls>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => tracing::warn!("SIGTERM: stopping at the next tick"),
                    _ = int.recv() => tracing::warn!("SIGINT: stopping at the next tick"),
                }
            });
            controls.stop.store(true, Ordering::Relaxed);
        })?;
    Ok(())
}

/// LeRobot's recording keys as lines on stdin: `n` (→, end the episode or reset now),
/// `r` (←, re-record the episode), `q` (Esc, save the episode under way and stop).
fn keys_from_stdin(controls: Arc<Controls>) {
    let spawned = std::thread::Builder::new()
        .name("keys".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let flag = match line.trim() {
                    "n" => &controls.exit_early,
                    "r" => &controls.rerecord,
                    "q" => &controls.stop_recording,
                    _ => {
                        eprintln!("keys: n + ENTER ends the episode or reset, r re-records it, q saves it and stops");
                        continue;
                    }
                };
                flag.store(true, Ordering::Relaxed);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no keyboard controls: {e}");
    }
}

/// Progress on stderr: about once a second, and every save.
fn print_progress(fps: u32) -> impl FnMut(Progress) {
    let every = fps.max(1) as usize;
    move |p| match p {
        Progress::Recording { episode, frame, of } if frame % every == 1 || frame == of => {
            eprintln!("recording episode {episode}: frame {frame}/{of}")
        }
        Progress::Saving { episode, frames } => {
            eprintln!("saving episode {episode} ({frames} frames)")
        }
        Progress::Saved { episode, seconds } => {
            eprintln!("saved episode {episode} in {seconds:.1} s")
        }
        Progress::Discarded { episode, frames } => {
            eprintln!("dropped episode {episode} ({frames} frames): recording it again")
        }
        Progress::Resetting { episode, tick, of } if tick % every == 0 => {
            eprintln!("reset after episode {episode}: tick {tick}/{of}")
        }
        _ => {}
    }
}

/// `zk0-agent record`.
pub fn record(args: RecordArgs) -> Result<()> {
    let opts = RecordOptions {
        task: args.task.clone(),
        episodes: args.episodes,
        episode_time_s: args.episode_time_s,
        reset_time_s: args.reset_time_s,
        fps: args.fps,
    };
    opts.validate()?;
    anyhow::ensure!(
        valid_repo_id(&args.repo_id),
        "--repo-id {:?} is not owner/name",
        args.repo_id
    );
    let root = match &args.dataset {
        Some(d) => d.clone(),
        None => crate::record::config::default_dataset_root(&args.repo_id)
            .context("no --dataset and no HF_LEROBOT_HOME, HF_HOME or HOME for the default")?,
    };
    let info = root.join("meta/info.json");
    if info.exists() {
        match lerobot_dataset::Info::load(&root) {
            // A run that failed before its first episode: nothing to keep, start afresh.
            Ok(i) if i.total_episodes == 0 => {
                tracing::warn!(dataset = %root.display(), "the dataset has no episode yet: starting it afresh");
                std::fs::remove_file(&info)
                    .with_context(|| format!("removing {}", info.display()))?;
            }
            _ => anyhow::bail!(
                "{} already holds a dataset: resuming one is not supported yet, record into a new directory",
                root.display()
            ),
        }
    }
    let robot = args.robot.robot()?;
    let controls = Arc::new(Controls::default());
    stop_on_signals(Arc::clone(&controls))?;
    let mut rig = robot.connect()?;
    let mut writer = DatasetWriter::create(&root, rig.dataset_config(opts.fps))
        .with_context(|| format!("creating the dataset in {}", root.display()))?;
    tracing::info!(dataset = %root.display(), repo_id = %args.repo_id, "recording");
    keys_from_stdin(Arc::clone(&controls));
    let (summary, result) = record::record(
        &mut rig,
        &mut writer,
        &opts,
        &controls,
        &mut print_progress(opts.fps),
    );
    let saved_before = writer.info().total_episodes;
    drop(rig.cameras);
    if let Err(e) = rig.teleop.disconnect() {
        tracing::warn!("disconnecting: {e}");
    }
    // The summary (counters included) is printed whether or not the run failed.
    let c = summary.clock;
    let bus = |b: &zk0_robot::BusStats| {
        serde_json::json!({"transactions": b.transactions, "retries": b.retries, "timeouts": b.timeouts,
                           "checksum_errors": b.checksum_errors, "corrupt": b.corrupt, "status_errors": b.status_errors})
    };
    let line = serde_json::json!({
        "dataset": root, "repo_id": args.repo_id, "saved": summary.saved,
        "interrupted": summary.interrupted, "error": result.as_ref().err().map(|e| e.to_string()),
        "clock": {"ticks": c.ticks, "overruns": c.overruns, "mean_period_s": c.mean_period_s,
                  "max_jitter_s": c.max_jitter_s},
        "cameras": summary.cameras.iter().map(|(k, v)| (k.clone(), serde_json::json!({"frames": v.frames, "dropped": v.dropped}))).collect::<serde_json::Map<_, _>>(),
        "buses": {"leader": bus(&summary.leader_bus), "follower": bus(&summary.follower_bus)},
    });
    println!("{line}");
    result.with_context(|| {
        format!(
            "recording into {} stopped; the {saved_before} episode(s) saved before are kept",
            root.display()
        )
    })?;
    Ok(())
}

fn valid_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        })
}

/// `zk0-agent teleop`.
pub fn teleop(args: TeleopArgs) -> Result<()> {
    let robot = args.robot.robot()?;
    let controls = Arc::new(Controls::default());
    stop_on_signals(Arc::clone(&controls))?;
    let mut clock = Clock::new(args.fps)?;
    let leader = robot.connect_arm(Role::Leader)?;
    let follower = robot.connect_arm(Role::Follower)?;
    let mut t = zk0_robot::control::Teleop::new(leader, follower);
    let start = Instant::now();
    let mut result = Ok(());
    while !controls.stop.load(Ordering::Relaxed)
        && args
            .time_s
            .is_none_or(|s| start.elapsed().as_secs_f64() < s)
    {
        clock.tick();
        match t.step() {
            Ok(step) if clock.stats().ticks % (args.fps.ceil() as u64).max(1) == 1 => {
                let a: Vec<String> = step.action.iter().map(|v| format!("{v:7.2}")).collect();
                eprintln!("action {}", a.join(" "));
            }
            Ok(_) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let s = clock.stats();
    if let Err(e) = t.disconnect() {
        tracing::warn!("disconnecting: {e}");
    }
    result?;
    println!(
        "{}",
        serde_json::json!({"ticks": s.ticks, "overruns": s.overruns, "mean_period_s": s.mean_period_s, "max_jitter_s": s.max_jitter_s})
    );
    Ok(())
}

/// `zk0-agent calibrate`: LeRobot's procedure, ENTER on stdin between its steps.
pub fn calibrate(args: CalibrateArgs) -> Result<()> {
    let mut robot = args.robot.robot()?;
    let role = match args.arm {
        ArmArg::Follower => Role::Follower,
        ArmArg::Leader => Role::Leader,
    };
    if let Some(p) = &args.port {
        match role {
            Role::Follower => robot.follower_port.clone_from(p),
            Role::Leader => robot.leader_port.clone_from(p),
        }
    }
    if let Some(id) = &args.id {
        match role {
            Role::Follower => robot.follower_id.clone_from(id),
            Role::Leader => robot.leader_id.clone_from(id),
        }
    }
    robot.validate()?;
    let path = robot.calibration_path(role)?;
    let part = format!("{} arm ({})", role_name(role), robot.port(role));
    let mut arm = robot.open_bare_arm(role, true)?;
    arm.connect().with_context(|| part.clone())?;
    // ENTERs come from a thread so positions keep being read while the user moves the arm.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() || tx.send(()).is_err() {
                break;
            }
        }
    });
    let mut cal = Calibrator::new(arm.motors());
    let mut commands = cal.start();
    loop {
        let out = Calibrator::run_step(&mut arm, commands).with_context(|| part.clone())?;
        if let Some(c) = out.save {
            c.save(&path)?;
            println!("saved {}", path.display());
            break;
        }
        for p in &out.prompts {
            match p {
                Prompt::MoveToMiddle => {
                    eprintln!("Move the {part} to the middle of its range of motion and press ENTER.")
                }
                Prompt::MoveThroughRanges => eprintln!(
                    "Move every joint except wrist_roll through its whole range of motion, then press ENTER."
                ),
            }
        }
        let enter = match out.event {
            // Waiting for the middle pose: block on ENTER.
            None => {
                rx.recv().context("stdin closed before ENTER")?;
                true
            }
            Some(_) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                rx.try_recv().is_ok()
            }
        };
        commands = if enter {
            match cal.on_event(Event::Enter) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}; keep moving it, then press ENTER again");
                    cal.on_event(out.event.clone().unwrap_or(Event::Enter))?
                }
            }
        } else {
            match out.event {
                Some(ev) => cal.on_event(ev)?,
                None => Vec::new(),
            }
        };
    }
    let _ = arm.disconnect();
    Ok(())
}
