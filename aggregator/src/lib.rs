//! `zk0-aggregator`'s library: the cloud daemon of a zk0 federation, in layers.
//!
//! The binary (`main.rs`) is the CLI. The daemon reads, from the wire inwards:
//!
//! | layer | modules | what |
//! |---|---|---|
//! | event loop (I/O) | [`server`] | MQTT in/out, executes the cores' verdicts, runs long work as jobs |
//! | pure cores | [`intake`], [`verify`], [`round`], [`schedule`], [`publish`] | upload table and manifest checks; blob verification; the round machine; LR/mu schedules; message building |
//! | round close | [`close`], [`aggregate`], [`server_eval`], [`outputs`], [`plots`], [`checkpoint`], [`hub`] | strategies and exclusion rules, evaluation, run outputs (beside the loop) |
//! | disk | [`store`], [`spool`], [`model_file`] | state-dir layout, `state.json`, keys; uploads written in place; the published model mapped from its file |
//! | plumbing | [`broker`], [`mtls`], [`acl`], [`metrics`], [`config`], [`tls`], [`doctor`], [`datasets`] | embedded rumqttd (logins bound to client ids) and its mutual-TLS front, mosquitto password/ACL files, Prometheus, `[config]`, certificates, `doctor` |
//!
//! The wire format is `shared_proto`; MQTT connect, TLS, signals and atomic files are
//! `zk0_daemon`. The cores are unit-tested without a broker.

pub mod acl;
pub mod aggregate;
pub mod broker;
pub mod checkpoint;
pub mod close;
pub mod config;
pub mod datasets;
pub mod doctor;
pub mod hub;
pub mod intake;
pub mod metrics;
pub mod model_file;
pub mod mtls;
pub mod outputs;
pub mod plots;
pub mod publish;
pub mod round;
pub mod schedule;
pub mod server;
pub mod server_eval;
pub mod spool;
pub mod store;
pub mod tls;
pub mod verify;
