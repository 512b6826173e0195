//! Downloads from the Hugging Face Hub through hf-hub, against a fake Hub on loopback
//! ([`zk0_e2e::fake_hub`]; the real one is out of reach here): `zk0-train eval --model
//! owner/name` fetches a LeRobot SmolVLA checkpoint and `zk0-agent dataset show --repo-id
//! owner/name` a LeRobot dataset into the cache at `HF_HUB_CACHE`, byte for byte, with the same
//! results as from a local directory; afterwards the same id works with `HF_HUB_OFFLINE=1` and
//! the Hub gone.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;
use zk0_e2e::fake_hub::{FakeHub, COMMIT};
use zk0_e2e::{bin, smolvla, workspace_root};

/// The command with no Hub settings inherited from the caller's environment.
fn clean(mut c: Command) -> Command {
    for v in ["HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT"] {
        c.env_remove(v);
    }
    c
}

/// Runs `c`; its last stdout line that is a JSON object.
fn json_out(c: &mut Command) -> Result<Value> {
    let out = c.output().context("starting")?;
    anyhow::ensure!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON on stdout")?;
    Ok(serde_json::from_str(last)?)
}

/// Checks what the Hub was asked (the repo info first, then every file) and that the cache's
/// snapshot holds every file byte for byte.
fn check_download(hub: FakeHub, info: &str, resolve: &str, snapshot: &Path) -> Result<()> {
    let files = hub.files.clone();
    let asked = hub.requests();
    anyhow::ensure!(asked.first().map(String::as_str) == Some(info), "{asked:?}");
    for (name, data) in &files {
        let url = format!("{resolve}{name}");
        anyhow::ensure!(asked.contains(&url), "{url} never requested: {asked:?}");
        let cached = std::fs::read(snapshot.join(name))
            .with_context(|| format!("{name} is not in the cache"))?;
        anyhow::ensure!(&cached == data, "{name}: cached bytes differ");
    }
    Ok(())
}

#[test]
fn zk0_train_downloads_a_checkpoint_by_hub_id_then_works_offline() -> Result<()> {
    let Some(train) = smolvla::zk0_train_or_skip()? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let model = smolvla::tiny_model_dir().join("pipeline/model");
    let dataset = workspace_root().join("tests/fixtures/lerobot-v3-tiny");
    let eval = |m: &str, out: &str| {
        let mut c = clean(Command::new(&train));
        c.args(["--threads", "1", "eval", "--model", m, "--tokenizer"])
            .arg(smolvla::tiny_tokenizer())
            .arg("--dataset")
            .arg(&dataset)
            .args(["--episodes", "1", "--out"])
            .arg(tmp.path().join(out));
        c
    };
    let by_dir = json_out(&mut eval(model.to_str().context("path")?, "dir.json"))?;

    let id = "zk0-test/smolvla-online";
    let files = std::fs::read_dir(&model)?.count();
    // The repo info, then a probe and a download per file.
    let hub = FakeHub::serve("models", id, &model, 1 + 2 * files)?;
    let cache = tmp.path().join("hub-cache");
    let endpoint = hub.endpoint.clone();
    let online = json_out(
        eval(id, "online.json")
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HUB_CACHE", &cache),
    )?;
    anyhow::ensure!(online["loss"] == by_dir["loss"], "{online} vs {by_dir}");
    let snapshot: PathBuf = cache
        .join("models--zk0-test--smolvla-online/snapshots")
        .join(COMMIT);
    check_download(
        hub,
        &format!("/api/models/{id}/revision/main"),
        &format!("/{id}/resolve/main/"),
        &snapshot,
    )?;

    // The Hub is gone (its server has stopped): offline, the cache alone serves the id.
    let offline = json_out(
        eval(id, "offline.json")
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1"),
    )?;
    anyhow::ensure!(offline["loss"] == by_dir["loss"], "{offline} vs {by_dir}");
    Ok(())
}

#[test]
fn zk0_agent_downloads_a_dataset_by_repo_id_then_works_offline() -> Result<()> {
    zk0_e2e::ensure_built()?;
    let tmp = tempfile::tempdir()?;
    let dataset = workspace_root().join("tests/fixtures/lerobot-v3-tiny");
    let show = |source: &[&str]| {
        let mut c = clean(Command::new(bin("zk0-agent")));
        c.args(["dataset", "show"])
            .args(source)
            .args(["--episode", "1", "--frame", "5", "--json"]);
        c
    };
    let by_dir = json_out(&mut show(&[dataset.to_str().context("path")?]))?;

    let id = "zk0-test/so100-tiny";
    let hub = FakeHub::serve("datasets", id, &dataset, 1 + 2 * count_files(&dataset)?)?;
    let cache = tmp.path().join("hub-cache");
    let endpoint = hub.endpoint.clone();
    let online = json_out(
        show(&["--repo-id", id])
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HUB_CACHE", &cache),
    )?;
    anyhow::ensure!(online == by_dir, "{online} vs {by_dir}");
    check_download(
        hub,
        &format!("/api/datasets/{id}/revision/main"),
        &format!("/datasets/{id}/resolve/main/"),
        &cache
            .join("datasets--zk0-test--so100-tiny/snapshots")
            .join(COMMIT),
    )?;

    let offline = json_out(
        show(&["--repo-id", id])
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1"),
    )?;
    anyhow::ensure!(offline == by_dir, "{offline} vs {by_dir}");
    Ok(())
}

fn count_files(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        n += if p.is_dir() { count_files(&p)? } else { 1 };
    }
    Ok(n)
}
