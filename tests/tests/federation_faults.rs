//! End-to-end fault tests with real processes and the REAL worker: every agent runs
//! `zk0-train train` on the tiny SmolVLA fixture and its own generated dataset (one libtorch
//! thread, 2 steps a round). One client's worker starts late
//! ([`smolvla::delayed_worker`]: `sleep`, then `exec zk0-train`), so the test knows who reports
//! last and can act while the round collects.
//!
//! - an agent killed (with its worker) during its round: the round closes at its deadline with
//!   the others and names the dropout; restarted, the agent takes part in the next round;
//! - the aggregator killed with `SIGKILL` mid-collect and restarted: the same round resumes with
//!   every accepted update intact, and the final model is bit-identical to an uninterrupted
//!   run's (same datasets, seeds and weights: `zk0-train` on one thread is deterministic);
//! - the broker (mosquitto, skipped when absent) restarted mid-round: everyone reconnects, the
//!   aggregator re-publishes its retained state, and the round completes.
//!
//! Every published model must also equal the weighted average of the deltas seen on the wire.
//! Skipped (with a message) when `zk0-train` cannot run here, unless `CI` is set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use zk0_e2e::federation::{find_mosquitto, BrokerKind, Federation, Observer};
use zk0_e2e::smolvla;

const CLIENTS: [(&str, u64, &str); 3] = [
    ("arm-a", 50, "f32"),
    ("arm-b", 120, "int8"),
    ("arm-c", 300, "f32"),
];

/// Local steps per round: enough to move the model, little enough for 2 cores.
const STEPS: u32 = 2;

fn accepted_in(state: &serde_json::Value) -> usize {
    state["accepted"].as_object().map_or(0, |m| m.len())
}

fn with_logs<T>(fed: &Federation, r: Result<T>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}

/// The real worker and the three generated datasets, or `None` when skipped.
fn prepare(tmp: &Path) -> Result<Option<(PathBuf, BTreeMap<String, PathBuf>)>> {
    zk0_e2e::ensure_built()?;
    let Some(train) = smolvla::zk0_train_or_skip()? else {
        return Ok(None);
    };
    let ds = smolvla::tiny_datasets(&tmp.join("datasets"), &CLIENTS)?;
    Ok(Some((train, ds)))
}

fn observed_rounds(fed: &Federation, observer: &Observer) -> Result<usize> {
    std::thread::sleep(Duration::from_millis(300));
    let seen = observer
        .seen
        .lock()
        .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
    fed.verify_rounds(&seen)
}

fn all_three() -> serde_json::Value {
    serde_json::json!(["arm-a", "arm-b", "arm-c"])
}

#[test]
fn killed_agent_drops_out_at_the_deadline_and_rejoins_the_next_round() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some((train, datasets)) = prepare(tmp.path())? else {
        return Ok(());
    };
    let t0 = Instant::now();
    let fdir = tmp.path().join("fed");
    std::fs::create_dir_all(&fdir)?;
    let mut fed = smolvla::real_federation(
        &fdir,
        BrokerKind::Embedded,
        &train,
        &CLIENTS,
        &datasets,
        STEPS,
    )?;
    // arm-c's worker would report 60 s late: it is killed long before.
    fed.worker_cmd
        .insert("arm-c".into(), smolvla::delayed_worker(&train, 60.0));
    let r = (|| -> Result<()> {
        // Deadline: ample for two real trainings on 2 cores, short for the test.
        fed.start_aggregator(2, 20.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        for (cid, _, _) in CLIENTS {
            fed.start_agent(cid, 2)?;
        }
        fed.wait_state(Duration::from_secs(30), "two updates in round 1", |s| {
            s["round"] == 1 && accepted_in(s) == 2
        })?;
        anyhow::ensure!(
            fed.state()?["accepted"].get("arm-c").is_none(),
            "arm-c reported before it was killed"
        );
        fed.kill_agent("arm-c")?;
        fed.wait_state(Duration::from_secs(40), "round 1 to close", |s| {
            s["round"] == 2
        })?;
        let st = fed.state()?;
        let h = &st["history"][0];
        anyhow::ensure!(
            h["dropped"] == serde_json::json!(["arm-c"]),
            "round 1 dropped {:?}",
            h["dropped"]
        );
        anyhow::ensure!(
            h["close_reason"] == "deadline",
            "round 1 closed by {:?}",
            h["close_reason"]
        );
        anyhow::ensure!(
            h["accepted"] == serde_json::json!(["arm-a", "arm-b"]),
            "round 1 accepted {:?}",
            h["accepted"]
        );
        // Restarted (a plain, undelayed worker), it joins round 2.
        fed.worker_cmd.remove("arm-c");
        fed.start_agent("arm-c", 1)?;
        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(60))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        let r2 = &state["history"][1];
        anyhow::ensure!(
            r2["accepted"] == all_three(),
            "round 2 accepted {:?}",
            r2["accepted"]
        );
        anyhow::ensure!(r2["close_reason"] == "all_reported", "round 2: {r2}");
        anyhow::ensure!(observed_rounds(&fed, &observer)? == 2, "expected 2 rounds");
        eprintln!("killed-agent scenario took {:.1?}", t0.elapsed());
        Ok(())
    })();
    with_logs(&fed, r)
}

/// Runs two rounds to the end; with `kill`, SIGKILLs the aggregator once two updates of
/// round 1 are in and restarts it. Returns the final model id.
fn two_rounds(
    dir: &Path,
    train: &Path,
    datasets: &BTreeMap<String, PathBuf>,
    kill: bool,
) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let mut fed =
        smolvla::real_federation(dir, BrokerKind::Embedded, train, &CLIENTS, datasets, STEPS)?;
    if kill {
        // Leaves time to kill and restart the aggregator before arm-c reports.
        fed.worker_cmd
            .insert("arm-c".into(), smolvla::delayed_worker(train, 8.0));
    }
    let r = (|| -> Result<String> {
        fed.start_aggregator(2, 90.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        for (cid, _, _) in CLIENTS {
            fed.start_agent(cid, 2)?;
        }
        if kill {
            let before =
                fed.wait_state(Duration::from_secs(40), "two updates in round 1", |s| {
                    s["round"] == 1 && accepted_in(s) == 2
                })?;
            anyhow::ensure!(
                before["accepted"].get("arm-c").is_none(),
                "arm-c reported before the kill"
            );
            fed.aggregator.as_mut().context("aggregator")?.kill(); // SIGKILL mid-collect
            fed.start_aggregator(2, 90.0, &[])?;
            let after = fed.state()?;
            anyhow::ensure!(
                after["round"] == 1 && after["accepted"] == before["accepted"],
                "accepted updates lost across the restart: {} vs {}",
                after["accepted"],
                before["accepted"]
            );
        }
        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(120))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        for h in state["history"].as_array().context("history")? {
            anyhow::ensure!(
                h["accepted"] == all_three(),
                "round {} accepted {:?}",
                h["round"],
                h["accepted"]
            );
        }
        anyhow::ensure!(observed_rounds(&fed, &observer)? == 2, "expected 2 rounds");
        state["model_id"]
            .as_str()
            .or_else(|| state["history"][1]["model_id"].as_str())
            .map(String::from)
            .context("final model id")
    })();
    with_logs(&fed, r)
}

#[test]
fn aggregator_killed_mid_collect_resumes_the_same_round() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some((train, datasets)) = prepare(tmp.path())? else {
        return Ok(());
    };
    let t0 = Instant::now();
    let interrupted = two_rounds(&tmp.path().join("interrupted"), &train, &datasets, true)?;
    let t1 = t0.elapsed();
    let uninterrupted = two_rounds(&tmp.path().join("reference"), &train, &datasets, false)?;
    eprintln!(
        "interrupted run {t1:.1?}, uninterrupted {:.1?}",
        t0.elapsed() - t1
    );
    anyhow::ensure!(
        interrupted == uninterrupted,
        "final model after the aggregator's kill -9 ({interrupted}) differs from the \
         uninterrupted run's ({uninterrupted})"
    );
    Ok(())
}

#[test]
fn broker_restart_mid_round_reconnects_everyone_and_completes() -> Result<()> {
    if find_mosquitto().is_none() {
        eprintln!("SKIPPED: mosquitto is not installed (apt install mosquitto)");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let Some((train, datasets)) = prepare(tmp.path())? else {
        return Ok(());
    };
    let t0 = Instant::now();
    let fdir = tmp.path().join("fed");
    std::fs::create_dir_all(&fdir)?;
    let mut fed = smolvla::real_federation(
        &fdir,
        BrokerKind::Mosquitto,
        &train,
        &CLIENTS,
        &datasets,
        STEPS,
    )?;
    fed.worker_cmd
        .insert("arm-c".into(), smolvla::delayed_worker(&train, 8.0));
    let r = (|| -> Result<()> {
        anyhow::ensure!(fed.start_broker()?, "mosquitto did not start");
        fed.start_aggregator(2, 90.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        for (cid, _, _) in CLIENTS {
            fed.start_agent(cid, 2)?;
        }
        fed.wait_state(Duration::from_secs(40), "two updates in round 1", |s| {
            s["round"] == 1 && accepted_in(s) == 2
        })?;
        anyhow::ensure!(
            fed.state()?["accepted"].get("arm-c").is_none(),
            "arm-c reported before the broker restart"
        );
        // Restart the broker (no persistence: its retained messages are gone too).
        fed.broker.as_mut().context("broker")?.kill();
        std::thread::sleep(Duration::from_millis(800));
        fed.start_broker()?;
        let st = fed
            .aggregator
            .as_mut()
            .context("aggregator")?
            .wait_timeout(Duration::from_secs(120))?;
        anyhow::ensure!(st.success(), "aggregator exited with {st}");
        let state = fed.state()?;
        for r in 0..2 {
            let h = &state["history"][r];
            anyhow::ensure!(
                h["accepted"] == all_three(),
                "round {}: {:?}",
                r + 1,
                h["accepted"]
            );
        }
        anyhow::ensure!(observed_rounds(&fed, &observer)? == 2, "expected 2 rounds");
        eprintln!("broker-restart scenario took {:.1?}", t0.elapsed());
        Ok(())
    })();
    with_logs(&fed, r)
}
