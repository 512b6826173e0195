//! `cargo xtask`: everything a developer or CI runs, with the environment set for them.
//!
//! - `setup`  finds or fetches libtorch and onnxruntime (and, on request, LeRobot's Python
//!   venv for interop tests and benchmarks) into a cache dir; idempotent and offline once done.
//! - `env`    prints the shell exports for that environment.
//! - `test`   fmt check, clippy with warnings denied, the no-libtorch proof, all tests.
//! - `demo`, `bench <name>`, `cross`, `fuzz <target>|--all [--seconds N]`.
//!
//! Every command that runs cargo sets LIBTORCH, LD_LIBRARY_PATH and ORT_DYLIB_PATH for its
//! children, so nobody juggles environment variables by hand.

mod cross;
mod setup;
mod tasks;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "zk0 developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Find or fetch libtorch and onnxruntime into the cache dir (ZK0_CACHE_DIR).
    Setup(setup::SetupArgs),
    /// Print `export` lines for a shell: eval "$(cargo xtask env)".
    Env,
    /// fmt check, clippy -D warnings, no-libtorch check, all workspace tests.
    Test(tasks::TestArgs),
    /// Run a whole federation on this machine.
    Demo {
        /// Arguments passed through to the demo.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark by name (`cargo xtask bench list` shows them).
    Bench {
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Cross-build zk0-agent and zk0-aggregator for aarch64 and smoke-test them under qemu.
    Cross(cross::CrossArgs),
    /// Run a cargo-fuzz target (or `--all` of them, one after another) for a bounded time
    /// each; installs cargo-fuzz when missing. Builds go to fuzz/target.
    Fuzz {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        target: Option<String>,
        /// Every target of fuzz/Cargo.toml.
        #[arg(long)]
        all: bool,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup(args) => setup::run(&args).map(|_| ()),
        Command::Env => {
            let env = setup::Env::load()?;
            print!("{}", env.shell_exports());
            Ok(())
        }
        Command::Test(args) => tasks::test(&args),
        Command::Demo { args } => tasks::demo(&args),
        Command::Bench { name, args } => tasks::bench(&name, &args),
        Command::Cross(args) => cross::cross(&args),
        Command::Fuzz {
            target,
            all,
            seconds,
        } => {
            let targets = match target {
                Some(t) if !all => vec![t],
                _ => tasks::fuzz_targets()?,
            };
            tasks::fuzz(&targets, seconds)
        }
    }
}
