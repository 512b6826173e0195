//! End-to-end robust aggregation: real `zk0-aggregator` and `zk0-agent` daemons on the embedded
//! broker and on mosquitto with the files of `acl --mosquitto` (these attacks use each robot's
//! own topics, which the ACL lets through), the test-only fake worker, and enrolled clients whose updates would poison the
//! global model. Each is refused or left out with its own reason and counter, and the model
//! published on the wire equals the weighted average of the honest updates alone (recomputed
//! by `verify_rounds` from what the observer saw).
//!
//! - `heavy_and_loud_updates_are_refused_and_left_out`: `heavy` claims 10^12 examples (refused
//!   at its manifest: `weight_bound`); `loud` sends a delta 1000× the others' (acked accepted,
//!   then left out at close as over 10× the round's median norm: `norm_outlier`).
//! - `an_update_overflowing_the_aggregate_is_left_out`: `huge` sends finite values at ±f32::MAX
//!   with most of the weight and `server_lr = 3`, which would make the new model ±∞; with two
//!   updates the norm rule cannot apply, so the finiteness check leaves it out
//!   (`non_finite_aggregate`) and the model is the honest update's step.

use std::time::Duration;

use anyhow::{Context, Result};
use zk0_e2e::federation::{BrokerKind, Federation, Observer};
use zk0_e2e::http_get;

/// A federation of `clients` (id, examples, codec) with the fake worker, on the embedded broker
/// or on mosquitto with the generated ACL (a login per client; the observer on an open
/// second listener).
fn setup(
    dir: &std::path::Path,
    kind: BrokerKind,
    clients: &[(&str, u64, &str)],
) -> Result<Federation> {
    let mut fed = Federation::fake(dir, kind, clients)?;
    if kind == BrokerKind::Mosquitto {
        for (cid, _, _) in clients {
            fed.users.insert(cid.to_string(), format!("pw-{cid}"));
        }
        fed.use_generated_acl(("zk0-aggregator", "pw-aggregator"))?;
        fed.observer_port = Some(zk0_e2e::free_port()?);
        anyhow::ensure!(fed.start_broker()?, "mosquitto is not installed");
    }
    Ok(fed)
}

/// Runs `clients` for `rounds` rounds (`env`: per-client worker environment), waits for the
/// aggregator to finish and checks every round with `verify_rounds`. Returns the state, the
/// `/metrics` text at the end and the acks seen.
fn run(
    fed: &mut Federation,
    rounds: u64,
    round_s: f64,
    env: &[(&str, &[(&str, &str)])],
) -> Result<(serde_json::Value, String, Observer)> {
    fed.metrics_listen = format!("127.0.0.1:{}", zk0_e2e::free_port()?);
    fed.start_aggregator(rounds, round_s, &[])?;
    let observer = Observer::start(fed.observer_port.unwrap_or(fed.port), &fed.federation)?;
    observer.wait_subscribed(Duration::from_secs(20))?;
    let clients: Vec<String> = fed.clients.iter().map(|c| c.0.clone()).collect();
    for cid in &clients {
        let e = env.iter().find(|(c, _)| c == cid).map_or(&[][..], |e| e.1);
        fed.start_agent_env(cid, rounds, e)?;
    }
    // The metrics die with the aggregator: read them once the last round is in the state.
    fed.wait_state(Duration::from_secs(120), "every round", |s| {
        s["history"].as_array().map(Vec::len) == Some(rounds as usize)
    })?;
    let metrics = http_get(&fed.metrics_listen, "/metrics")?;
    fed.finish_and_verify(&observer, rounds, Duration::from_secs(60))?;
    Ok((fed.state()?, metrics, observer))
}

fn ack(o: &Observer, cid: &str, round: u64) -> Option<(bool, Option<String>)> {
    o.seen
        .lock()
        .ok()?
        .acks
        .get(&(cid.to_string(), round))
        .cloned()
}

fn counter(metrics: &str, name: &str, reason: &str) -> Result<()> {
    let line = format!("zk0_aggregator_{name}_total{{reason=\"{reason}\"}} 1");
    anyhow::ensure!(metrics.contains(&line), "metrics lack {line:?}:\n{metrics}");
    Ok(())
}

/// The round's exclusions as (client, reason), from the state and from the round record.
fn excluded(
    fed: &Federation,
    state: &serde_json::Value,
    round: u64,
) -> Result<Vec<(String, String)>> {
    let pairs = |v: &serde_json::Value| -> Vec<(String, String)> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (s("client_id"), s("reason"))
            })
            .collect()
    };
    let from_state = pairs(&state["history"][(round - 1) as usize]["excluded"]);
    let path = fed
        .state_dir
        .join(format!("round_{round:03}_server_eval.json"));
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    anyhow::ensure!(
        pairs(&record["excluded"]) == from_state,
        "round record {} and state disagree on the exclusions",
        path.display()
    );
    Ok(from_state)
}

#[test]
fn heavy_and_loud_updates_are_refused_and_left_out() -> Result<()> {
    heavy_and_loud(BrokerKind::Embedded)
}

#[test]
fn heavy_and_loud_updates_are_refused_and_left_out_through_mosquittos_acl() -> Result<()> {
    heavy_and_loud(BrokerKind::Mosquitto)
}

fn heavy_and_loud(kind: BrokerKind) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let clients = [
        ("robot-a", 50, "f32"),
        ("robot-b", 120, "f32"),
        ("heavy", 1_000_000_000_000, "f32"),
        ("loud", 80, "f32"),
    ];
    let mut fed = setup(tmp.path(), kind, &clients)?;
    let r = (|| -> Result<()> {
        // heavy's refused update never counts, so the round closes at its deadline.
        let (state, metrics, observer) = run(
            &mut fed,
            1,
            15.0,
            &[("loud", &[("ZK0_FAKE_WORKER_SCALE", "1000")])],
        )?;
        anyhow::ensure!(
            ack(&observer, "heavy", 1) == Some((false, Some("weight_bound".into()))),
            "heavy: {:?}",
            ack(&observer, "heavy", 1)
        );
        anyhow::ensure!(ack(&observer, "loud", 1) == Some((true, None)));
        let h = &state["history"][0];
        anyhow::ensure!(
            h["accepted"] == serde_json::json!(["loud", "robot-a", "robot-b"])
                && h["dropped"] == serde_json::json!(["heavy"]),
            "round 1: {h:?}"
        );
        anyhow::ensure!(
            excluded(&fed, &state, 1)? == [("loud".to_string(), "norm_outlier".to_string())],
            "round 1 excluded: {:?}",
            h["excluded"]
        );
        counter(&metrics, "updates_rejected", "weight_bound")?;
        counter(&metrics, "updates_excluded", "norm_outlier")?;
        let zero = "zk0_aggregator_updates_excluded_total{reason=\"non_finite_aggregate\"} 0";
        anyhow::ensure!(metrics.contains(zero), "nothing overflowed:\n{metrics}");
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}

#[test]
fn an_update_overflowing_the_aggregate_is_left_out() -> Result<()> {
    overflow(BrokerKind::Embedded)
}

#[test]
fn an_update_overflowing_the_aggregate_is_left_out_through_mosquittos_acl() -> Result<()> {
    overflow(BrokerKind::Mosquitto)
}

fn overflow(kind: BrokerKind) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut fed = setup(
        tmp.path(),
        kind,
        &[("robot-a", 100, "f32"), ("huge", 300, "f32")],
    )?;
    fed.aggregator_toml = "[rounds]\nserver_lr = 3.0\n".into();
    fed.server_lr = 3.0;
    let r = (|| -> Result<()> {
        let (state, metrics, observer) = run(
            &mut fed,
            2,
            60.0,
            &[("huge", &[("ZK0_FAKE_WORKER_SCALE", "1e60")])],
        )?;
        for round in 1..=2 {
            anyhow::ensure!(ack(&observer, "huge", round) == Some((true, None)));
            anyhow::ensure!(
                excluded(&fed, &state, round)?
                    == [("huge".to_string(), "non_finite_aggregate".to_string())],
                "round {round} excluded: {:?}",
                state["history"][(round - 1) as usize]["excluded"]
            );
        }
        let line = "zk0_aggregator_updates_excluded_total{reason=\"non_finite_aggregate\"} 2";
        anyhow::ensure!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
        let id = state["model_id"].as_str().context("model id")?;
        let model = fed.model(id)?;
        anyhow::ensure!(
            model.values().all(|t| t.data.iter().all(|x| x.is_finite())),
            "the final model is finite"
        );
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
