//! End-to-end fault tests on the embedded broker, with real processes (the agents run the
//! test-only `zk0-fake-worker`; `ZK0_FAKE_WORKER_SLEEP_MS` makes one of them slow so the test
//! can act while a round collects).
//!
//! - an agent killed during its round: the round closes at its deadline with the others and
//!   names the dropout; restarted, the agent takes part in the next round;
//! - the aggregator killed with `SIGKILL` mid-collect and restarted: the same round resumes with
//!   every accepted update intact, and every published model still equals the weighted average;
//! - the broker (mosquitto, skipped when absent) restarted mid-round: everyone reconnects, the
//!   aggregator re-publishes its retained state, and the round completes.

use std::time::Duration;

use anyhow::{Context, Result};
use zk0_e2e::federation::{find_mosquitto, BrokerKind, Federation, Observer};

const CLIENTS: [(&str, u64, &str); 3] = [
    ("robot-a", 50, "f32"),
    ("robot-b", 120, "int8"),
    ("robot-c", 300, "f32"),
];

fn accepted_in(state: &serde_json::Value) -> usize {
    state["accepted"].as_object().map_or(0, |m| m.len())
}

fn with_logs<T>(fed: &Federation, r: Result<T>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}

#[test]
fn killed_agent_drops_out_at_the_deadline_and_rejoins_the_next_round() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::setup(
        tmp.path(),
        BrokerKind::Embedded,
        env!("CARGO_BIN_EXE_zk0-fake-worker").as_ref(),
        &CLIENTS,
    )?;
    let r = (|| -> Result<()> {
        fed.start_aggregator(2, 6.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        fed.start_agent("robot-a", 2)?;
        fed.start_agent("robot-b", 2)?;
        fed.start_agent_env("robot-c", 2, &[("ZK0_FAKE_WORKER_SLEEP_MS", "1000")])?;
        fed.wait_state(Duration::from_secs(30), "two updates in round 1", |s| {
            s["round"] == 1 && accepted_in(s) == 2
        })?;
        fed.agents.get_mut("robot-c").context("robot-c")?.kill();
        fed.wait_state(Duration::from_secs(30), "round 1 to close", |s| {
            s["round"] == 2
        })?;
        let st = fed.state()?;
        let h = &st["history"][0];
        anyhow::ensure!(
            h["dropped"] == serde_json::json!(["robot-c"]),
            "round 1 dropped {:?}",
            h["dropped"]
        );
        anyhow::ensure!(
            h["close_reason"] == "deadline",
            "round 1 closed by {:?}",
            h["close_reason"]
        );
        fed.start_agent("robot-c", 1)?;
        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(60))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        let r2 = &state["history"][1];
        anyhow::ensure!(
            r2["accepted"] == serde_json::json!(["robot-a", "robot-b", "robot-c"]),
            "round 2 accepted {:?}",
            r2["accepted"]
        );
        std::thread::sleep(Duration::from_millis(300));
        let seen = observer
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        anyhow::ensure!(fed.verify_rounds(&seen)? == 2, "expected 2 rounds");
        Ok(())
    })();
    with_logs(&fed, r)
}

#[test]
fn aggregator_killed_mid_collect_resumes_the_same_round() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::setup(
        tmp.path(),
        BrokerKind::Embedded,
        env!("CARGO_BIN_EXE_zk0-fake-worker").as_ref(),
        &CLIENTS,
    )?;
    let r = (|| -> Result<()> {
        fed.start_aggregator(2, 60.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        fed.start_agent("robot-a", 2)?;
        fed.start_agent("robot-b", 2)?;
        // Slow in round 1 only matters: 10 steps × 400 ms leaves time to kill and restart.
        fed.start_agent_env("robot-c", 2, &[("ZK0_FAKE_WORKER_SLEEP_MS", "400")])?;
        let before = fed.wait_state(Duration::from_secs(30), "two updates in round 1", |s| {
            s["round"] == 1 && accepted_in(s) == 2
        })?;
        fed.aggregator.as_mut().context("aggregator")?.kill(); // SIGKILL mid-collect
        fed.start_aggregator(2, 60.0, &[])?;
        let after = fed.state()?;
        anyhow::ensure!(
            after["round"] == 1 && after["accepted"] == before["accepted"],
            "accepted updates lost across the restart"
        );
        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(90))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        let r1 = &state["history"][0];
        anyhow::ensure!(
            r1["accepted"] == serde_json::json!(["robot-a", "robot-b", "robot-c"]),
            "round 1 accepted {:?}",
            r1["accepted"]
        );
        std::thread::sleep(Duration::from_millis(300));
        let seen = observer
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        // Equal to the weighted average of the same three updates: what an uninterrupted run
        // publishes (aggregation folds clients in sorted order, so it is deterministic).
        anyhow::ensure!(fed.verify_rounds(&seen)? == 2, "expected 2 rounds");
        Ok(())
    })();
    with_logs(&fed, r)
}

#[test]
fn broker_restart_mid_round_reconnects_everyone_and_completes() -> Result<()> {
    if find_mosquitto().is_none() {
        eprintln!("SKIPPED: mosquitto is not installed (apt install mosquitto)");
        return Ok(());
    }
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::setup(
        tmp.path(),
        BrokerKind::Mosquitto,
        env!("CARGO_BIN_EXE_zk0-fake-worker").as_ref(),
        &CLIENTS,
    )?;
    let r = (|| -> Result<()> {
        fed.start_broker()?;
        fed.start_aggregator(2, 60.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        fed.start_agent("robot-a", 2)?;
        fed.start_agent("robot-b", 2)?;
        fed.start_agent_env("robot-c", 2, &[("ZK0_FAKE_WORKER_SLEEP_MS", "400")])?;
        fed.wait_state(Duration::from_secs(30), "two updates in round 1", |s| {
            s["round"] == 1 && accepted_in(s) == 2
        })?;
        // Restart the broker (no persistence: its retained messages are gone too).
        fed.broker.as_mut().context("broker")?.kill();
        std::thread::sleep(Duration::from_millis(800));
        fed.start_broker()?;
        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(90))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        for r in 0..2 {
            let h = &state["history"][r];
            anyhow::ensure!(
                h["accepted"] == serde_json::json!(["robot-a", "robot-b", "robot-c"]),
                "round {}: {:?}",
                r + 1,
                h["accepted"]
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        let seen = observer
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
        anyhow::ensure!(fed.verify_rounds(&seen)? == 2, "expected 2 rounds");
        Ok(())
    })();
    with_logs(&fed, r)
}
