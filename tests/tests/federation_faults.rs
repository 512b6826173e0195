//! End-to-end fault tests with real processes and the REAL worker: every agent runs
//! `zk0-train train` on the tiny SmolVLA fixture and its own generated dataset (one libtorch
//! thread, 2 steps a round). In the aggregator and broker tests one client's worker starts late
//! ([`smolvla::delayed_worker`]: `sleep`, then `exec zk0-train`), so the test knows who reports
//! last and can act while the round collects; in the killed-agent test one client's upload is
//! slow instead.
//!
//! - an agent killed (`SIGKILL`, with its worker) mid-upload, with some of its update's chunks
//!   spooled by the aggregator and not all (its uplink capped by `upload_max_bytes_per_sec`):
//!   the round closes at its deadline with the others and names the dropout; restarted, the
//!   agent takes part in the next round;
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

/// arm-c's uplink in the killed-agent test: its f32 update (195 k parameters, ≈ 0.6 MB after
/// zstd, ≈ 19 chunks of 32 KiB) takes ≈ 6 s to upload, one chunk every ≈ 0.3 s.
const SLOW_UPLINK_BYTES_PER_SEC: u64 = 100_000;

/// Update chunks of `cid` the aggregator has spooled in `round`: the records of its chunk log
/// (`spool/r<round>/<cid>.chunks`, 8 bytes per stored chunk; see `aggregator::spool`).
fn spooled_chunks(fed: &Federation, round: u64, cid: &str) -> usize {
    let log = fed
        .state_dir
        .join("spool")
        .join(format!("r{round}"))
        .join(format!("{cid}.chunks"));
    std::fs::metadata(log).map_or(0, |m| m.len() as usize / 8)
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
    // Small chunks, and arm-c on a slow uplink: its upload lasts seconds, so it can be killed
    // in the middle of it.
    fed.chunk_size = 32 << 10;
    let arm_c = fed.agent_extra.get("arm-c").cloned().unwrap_or_default();
    fed.agent_extra.insert(
        "arm-c".into(),
        format!("{arm_c}\nupload_max_bytes_per_sec = {SLOW_UPLINK_BYTES_PER_SEC}\n"),
    );
    let r = (|| -> Result<()> {
        // Deadline: ample for three real trainings on 2 cores, short for the test.
        fed.start_aggregator(2, 20.0, &[])?;
        let observer = Observer::start(fed.port, &fed.federation)?;
        observer.wait_subscribed(Duration::from_secs(20))?;
        for (cid, _, _) in CLIENTS {
            fed.start_agent(cid, 2)?;
        }
        // Mid-upload: the aggregator has spooled a few of arm-c's chunks.
        zk0_e2e::wait_for(Duration::from_secs(20), "arm-c's upload to start", || {
            (spooled_chunks(&fed, 1, "arm-c") >= 3).then_some(())
        })?;
        fed.kill_agent("arm-c")?;
        let spooled = spooled_chunks(&fed, 1, "arm-c");
        let (seen_chunks, manifest) = {
            let seen = observer
                .seen
                .lock()
                .map_err(|_| anyhow::anyhow!("observer poisoned"))?;
            let key = ("arm-c".to_string(), 1);
            (
                seen.update_chunks.get(&key).map_or(0, |c| c.len()),
                seen.update_manifests.get(&key).map(|m| m[0].chunk_count),
            )
        };
        // The manifest goes first: the upload was cut short if chunks are still missing.
        let Some(count) = manifest else {
            anyhow::bail!("arm-c's manifest was never seen");
        };
        anyhow::ensure!(
            (spooled as u32) < count && fed.state()?["accepted"].get("arm-c").is_none(),
            "arm-c finished its upload before it was killed ({spooled} of {count} chunks spooled)"
        );
        eprintln!(
            "arm-c killed mid-upload: {spooled} of {count} chunks spooled by the aggregator, \
             {seen_chunks} seen on the wire"
        );
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
        // Restarted (uplink unlimited now), it joins round 2.
        fed.agent_extra.insert("arm-c".into(), arm_c);
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
