//! End-to-end with the real worker: one `zk0-aggregator` (embedded broker) initialised with the
//! trainable tensors of the vendored tiny LeRobot SmolVLA, three `zk0-agent` daemons each
//! running `zk0-train train` on its own generated SO-100-like dataset, three FedProx rounds.
//! After every round the model published on the wire must equal, within 1e-6, the
//! example-weighted average the test recomputes from the deltas it observed.
//!
//! Skipped (with a message) when `zk0-train` cannot run here (libtorch missing: run under
//! `eval "$(cargo xtask env)"`), unless `CI` is set, where that is a failure.

use std::time::{Duration, Instant};

use anyhow::Result;
use zk0_e2e::federation::BrokerKind;
use zk0_e2e::smolvla;

/// (id, aggregation weight, codec): different weights, so the average is really weighted.
const CLIENTS: [(&str, u64, &str); 3] = [
    ("arm-a", 40, "f32"),
    ("arm-b", 100, "int8"),
    ("arm-c", 250, "bf16"),
];

#[test]
fn three_rounds_of_real_smolvla_training() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let Some(train) = smolvla::zk0_train_or_skip()? else {
        return Ok(());
    };
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let model_dir = smolvla::tiny_model_dir();
    assert_eq!(smolvla::cameras_of(&model_dir)?, ["front:64x48"]);
    let datasets = smolvla::tiny_datasets(&tmp.path().join("datasets"), &CLIENTS)?;

    // The global model: the fixture's trainable tensors; zk0-train agrees on which they are.
    let initial = smolvla::tiny_trainable()?;
    assert_eq!(initial.len(), 47);
    let extracted = smolvla::extract_trainable(
        &train,
        &model_dir,
        Some(&smolvla::tiny_tokenizer()),
        &datasets["arm-a"],
        &tmp.path().join("extracted.safetensors"),
    )?;
    anyhow::ensure!(
        extracted == initial,
        "zk0-train's trainable tensors differ from fixture.json's trainable_parameters"
    );

    let mut fed = smolvla::real_federation(
        tmp.path(),
        BrokerKind::Embedded,
        &train,
        &CLIENTS,
        &datasets,
        3,
    )?;
    let result = fed
        .run_rounds(&CLIENTS, 3, 120.0, Duration::from_secs(150))
        .and_then(|state| smolvla::check_real_rounds(&fed, &state, &CLIENTS, 3, 3));
    eprintln!("federation_smolvla took {:.1?}", t0.elapsed());
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", fed.logs()))
}
