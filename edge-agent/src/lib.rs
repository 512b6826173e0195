//! `zk0-agent`: the daemon on each robot host, as a library the binary (`main.rs`), tests and
//! benches share.
//!
//! It records demonstrations, takes part in federated rounds (spawning `zk0-train` for the
//! libtorch work so this process never links libtorch), runs the ONNX policy, and checks the
//! host (`doctor`). Each subcommand lives in its own module; `start` / `stop` / `status` run
//! the daemon in the background with a pidfile, log and status file in its work dir.
//!
//! Map:
//! - [`cli`]: the `run` / `start` arguments (config overrides) and the `keys` command;
//! - [`federate`]: the federated-learning daemon. Its pure state machine is
//!   [`federate::core`] (`Core::on(Event, now) -> Vec<Command>`); `federate/mod.rs` is the event
//!   loop that executes those commands (MQTT, child processes, files);
//! - [`fleet`]: `start` / `stop` / `status` (pidfile, status file);
//! - [`doctor`], [`dataset_cli`]: host checks and dataset inspection;
//! - [`record`]: the record loop (arms and cameras from `zk0-robot` into the LeRobot v3
//!   writer) and the config's `[robot]` section; [`robot_cli`]: `record`, `teleop`,
//!   `calibrate`;
//! - [`act`]: the policy driving the follower (control loop, inference worker thread,
//!   [`zk0_infer::ActionQueue`]); [`act_cli`]: `act` and the config's `[infer]` section;
//!   [`infer_cli`]: `infer`, open-loop evaluation on a recorded episode.

pub mod act;
pub mod act_cli;
pub mod cli;
pub mod dataset_cli;
pub mod doctor;
pub mod federate;
pub mod fleet;
pub mod infer_cli;
pub mod record;
pub mod robot_cli;
