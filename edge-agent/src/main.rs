//! `zk0-agent`: the daemon on each robot host.
//!
//! It records demonstrations, takes part in federated rounds (spawning `zk0-train` for the
//! libtorch work so this process never links libtorch), runs the ONNX policy, and checks the
//! host (`doctor`). Each subcommand lives in its own module.

mod dataset_cli;
mod doctor;
mod federate;

use clap::{Parser, Subcommand};

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
    /// Run the federated-learning daemon: join rounds, fetch models, train, send updates.
    #[command(alias = "federate")]
    Run(federate::RunArgs),
    /// Manage this agent's signing key pair.
    Keys {
        #[command(subcommand)]
        cmd: federate::KeysCmd,
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
        Command::Run(args) => federate::run(args),
        Command::Keys { cmd } => federate::keys(cmd),
    }
}
