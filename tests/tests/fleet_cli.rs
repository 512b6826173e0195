//! End-to-end: the aggregator's zk0 schedule reaches every worker through the round
//! announcement, and both status commands show the run (clients, rounds, last losses).
//!
//! One real `zk0-aggregator` (embedded broker) and three real `zk0-agent`s running the
//! test-only fake worker behind a wrapper that records each worker's command line. With
//! `lr = 1e-3`, `t_0 = 2`, `t_mult = 2` the warm-restart cosine gives round 1 `1e-3`, round 2
//! `(1e-3 + eta_min)/2`, and restarts at round 3: `1e-3` again. All workers report the same
//! loss, so mu stays at the configured value and nobody is boosted.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use zk0_e2e::federation::{BrokerKind, Federation};

const CLIENTS: [(&str, u64, &str); 3] = [
    ("arm-a", 10, "f32"),
    ("arm-b", 20, "int8"),
    ("arm-c", 30, "f32"),
];

fn arg<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let mut it = line.split_whitespace();
    it.find(|a| *a == name)?;
    it.next()
}

#[test]
fn scheduled_lr_reaches_every_worker_and_status_shows_the_run() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let log = tmp.path().join("worker-args.log");
    let script = tmp.path().join("worker.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
            log.display(),
            env!("CARGO_BIN_EXE_zk0-fake-worker")
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut fed = Federation::setup(tmp.path(), BrokerKind::Embedded, &script, &CLIENTS)?;
    fed.aggregator_toml =
        "[rounds]\nlr = 1e-3\nmu = 0.02\nlocal_steps = 4\n[schedule]\nt_0 = 2\nt_mult = 2\n".into();
    let result = (|| -> Result<()> {
        fed.start_aggregator(3, 60.0, &[])?;
        for (cid, _, _) in CLIENTS {
            fed.start_agent(cid, 3)?;
        }
        let st = fed
            .aggregator
            .as_mut()
            .map(|a| a.wait_timeout(Duration::from_secs(180)))
            .transpose()?;
        anyhow::ensure!(
            st.is_some_and(|s| s.success()),
            "aggregator exited with {st:?}"
        );
        for (cid, _, _) in CLIENTS {
            if let Some(a) = fed.agents.get_mut(cid) {
                let st = a.wait_timeout(Duration::from_secs(30))?;
                anyhow::ensure!(st.success(), "agent {cid} exited with {st}");
            }
        }

        // What each worker was told, in round order per client.
        let text = std::fs::read_to_string(&log).context("worker log")?;
        let mut per_client: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for line in text.lines() {
            let ds = arg(line, "--dataset").context("no --dataset")?;
            let cid = CLIENTS
                .iter()
                .find(|(c, _, _)| ds.ends_with(&format!("ds-{c}")))
                .context("unknown dataset")?
                .0;
            let lr: f64 = arg(line, "--lr").context("no --lr")?.parse()?;
            let mu: f64 = arg(line, "--mu").context("no --mu")?.parse()?;
            per_client.entry(cid.into()).or_default().push((lr, mu));
        }
        let eta = 5e-7;
        let want = [1e-3, eta + (1e-3 - eta) / 2.0, 1e-3];
        for (cid, _, _) in CLIENTS {
            let got = &per_client[cid];
            anyhow::ensure!(got.len() == 3, "{cid}: {got:?}");
            for (r, ((lr, mu), w)) in got.iter().zip(want).enumerate() {
                anyhow::ensure!(
                    (lr - w).abs() <= 1e-12 * w,
                    "{cid} round {}: lr {lr} want {w}",
                    r + 1
                );
                anyhow::ensure!(*mu == 0.02, "{cid} round {}: mu {mu}", r + 1);
            }
        }

        // The aggregator's status: every client with its last loss (fake worker: 1/steps).
        let out = Command::new(zk0_e2e::bin("zk0-aggregator"))
            .arg("--config")
            .arg(fed.dir.join("aggregator.toml"))
            .arg("--state-dir")
            .arg(&fed.state_dir)
            .arg("status")
            .output()?;
        let s = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(out.status.success(), "status: {s}");
        for (cid, _, _) in CLIENTS {
            let line = s
                .lines()
                .find(|l| l.trim_start().starts_with(cid))
                .with_context(|| format!("{cid} missing from status:\n{s}"))?;
            anyhow::ensure!(line.contains("last loss 0.250000"), "{line}");
        }
        anyhow::ensure!(s.contains("round:     4"), "{s}");

        // Each agent's status: not running any more, round 3 trained and accepted.
        for (cid, _, _) in CLIENTS {
            let out = Command::new(zk0_e2e::bin("zk0-agent"))
                .arg("status")
                .arg("--config")
                .arg(fed.dir.join(cid).join("agent.toml"))
                .output()?;
            let s = String::from_utf8_lossy(&out.stdout);
            anyhow::ensure!(out.status.success(), "agent status: {s}");
            for want in [
                "daemon:     not running",
                "connected:  no",
                "round:      3",
                "last loss:  0.250000 (round 3, accepted)",
                "rounds:     3",
            ] {
                anyhow::ensure!(s.contains(want), "{cid}: no {want:?} in\n{s}");
            }
        }
        Ok(())
    })();
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
