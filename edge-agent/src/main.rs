//! `zk0-agent`: the daemon on each robot host (see the library's crate doc for the map).

use clap::{Parser, Subcommand};
use edge_agent::{act_cli, cli, dataset_cli, doctor, fleet, infer_cli, robot_cli};

#[derive(Parser)]
#[command(name = "zk0-agent", version, about = "zk0 robot-host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check this host: CPU, memory, disk, GPU, onnxruntime, serial ports, cameras, config.
    Doctor(doctor::Args),
    /// Inspect LeRobot datasets: info, show, verify, convert.
    Dataset(dataset_cli::Args),
    /// Record LeRobot v3.0 episodes: leader drives follower, cameras and positions recorded.
    Record(robot_cli::RecordArgs),
    /// Drive the follower from the leader (nothing recorded).
    Teleop(robot_cli::TeleopArgs),
    /// Calibrate an arm (LeRobot's procedure and file).
    Calibrate(robot_cli::CalibrateArgs),
    /// Open-loop evaluation of an ONNX export on a recorded episode (ONNX Runtime): predicted
    /// chunks, their error against the recorded actions, optionally written to a file.
    Infer(infer_cli::InferArgs),
    /// Drive the follower with an ONNX export (asynchronous inference: the control loop
    /// never waits for the policy); a JSON report at the end.
    Act(act_cli::ActArgs),
    /// Run the federated-learning daemon: join rounds, fetch models, train, send updates.
    #[command(alias = "federate")]
    Run(cli::RunArgs),
    /// Start `run` in the background (same options as `run`, e.g. `--dataset <repo id or
    /// dir>`): pidfile, log and status file in `work_dir`; refused while it already runs.
    Start(cli::RunArgs),
    /// Stop the background agent (SIGTERM, then wait for it to exit).
    Stop {
        #[command(flatten)]
        args: fleet::ControlArgs,
        /// Seconds to wait for the exit.
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
    /// Show whether the agent runs, is connected, its round and last local loss.
    Status {
        #[command(flatten)]
        args: fleet::ControlArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Manage this agent's signing key pair.
    Keys {
        #[command(subcommand)]
        cmd: cli::KeysCmd,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor(args) => doctor::run(args),
        Command::Dataset(args) => dataset_cli::run(args),
        Command::Record(args) => robot_cli::record(args),
        Command::Teleop(args) => robot_cli::teleop(args),
        Command::Calibrate(args) => robot_cli::calibrate(args),
        Command::Infer(args) => infer_cli::run(args),
        Command::Act(args) => act_cli::run(args),
        Command::Run(args) => {
            let max_rounds = args.max_rounds;
            edge_agent::federate::run(args.config()?, max_rounds)
        }
        Command::Keys { cmd } => cli::keys(cmd),
        Command::Start(args) => fleet::start(&args),
        Command::Stop { args, timeout_s } => {
            fleet::stop(&args, std::time::Duration::from_secs(timeout_s))
        }
        Command::Status { args, json } => fleet::status(&args, json),
    }
}
