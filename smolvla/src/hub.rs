//! Checkpoints by Hugging Face Hub id: `--model lerobot/smolvla_base` resolves to a snapshot
//! directory in hf-hub's cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`),
//! downloading the repository's files when needed. With `HF_HUB_OFFLINE=1` only the cache is
//! consulted, as in LeRobot and transformers.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

/// Whether `s` has the shape of a Hub repository id (`owner/name`, one slash, no path syntax).
pub fn looks_like_repo_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// hf-hub reads `HF_HOME`; `HF_HUB_CACHE` (which the Python tools honour) overrides it.
fn hub_cache_override() -> Option<PathBuf> {
    std::env::var_os("HF_HUB_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The cache directory that [`resolve`] uses.
pub fn cache_dir() -> PathBuf {
    hub_cache_override()
        .map(Cache::new)
        .unwrap_or_else(Cache::from_env)
        .path()
        .clone()
}

/// The snapshot directory of model `repo_id` at `revision` (default `main`) in the cache at
/// `cache_dir`, if its `config.json` is there.
pub fn cached_snapshot(cache_dir: &Path, repo_id: &str, revision: Option<&str>) -> Option<PathBuf> {
    let repo = Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    );
    let config = Cache::new(cache_dir.to_path_buf())
        .repo(repo)
        .get("config.json")?;
    Some(config.parent()?.to_path_buf())
}

/// A checkpoint argument: an existing directory as is; otherwise a Hub id (`owner/name`)
/// resolved through the cache (downloading unless offline). Anything else is an error naming it.
pub fn resolve_checkpoint(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(model) {
        return Err(Error::Hub(format!(
            "{model}: not a checkpoint directory nor a Hub id (owner/name)"
        )));
    }
    resolve(model, None)
}

/// Downloads (or finds in the cache) every file of model repository `repo_id` and returns its
/// snapshot directory.
pub fn resolve(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let cache = cache_dir();
    if offline() {
        return cached_snapshot(&cache, repo_id, revision).ok_or_else(|| {
            Error::Hub(format!(
                "{repo_id}: no snapshot with a config.json in the Hub cache at {} and \
                 HF_HUB_OFFLINE is set (download it first, or pass a checkpoint directory)",
                cache.display()
            ))
        });
    }
    let hub = |e: &dyn std::fmt::Display| Error::Hub(format!("{repo_id}: {e}"));
    let mut builder = ApiBuilder::from_env().with_progress(false);
    if let Some(dir) = hub_cache_override() {
        builder = builder.with_cache_dir(dir);
    }
    let api = builder.build().map_err(|e| hub(&e))?;
    let r = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    ));
    let info = r.info().map_err(|e| hub(&e))?;
    let mut root = None;
    for s in &info.siblings {
        let path = r
            .get(&s.rfilename)
            .map_err(|e| hub(&format!("{}: {e}", s.rfilename)))?;
        if s.rfilename == "config.json" {
            root = path.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| Error::Hub(format!("{repo_id}: no config.json in the repository")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_recognised() {
        for ok in ["lerobot/smolvla_base", "a-b/c.d_e", "o/n"] {
            assert!(looks_like_repo_id(ok), "{ok}");
        }
        for bad in [
            "smolvla",
            "/abs/path",
            "./x/y",
            "a/b/c",
            "a/",
            "/b",
            "../x",
            "a b/c",
        ] {
            assert!(!looks_like_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn finds_a_snapshot_in_a_cache_layout() {
        let tmp = std::env::temp_dir().join(format!("zk0-hub-unit-{}", std::process::id()));
        let repo = tmp.join("models--owner--name");
        let snap = repo.join("snapshots").join("0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
        assert_eq!(cached_snapshot(&tmp, "owner/name", None), None);
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(cached_snapshot(&tmp, "owner/name", None), Some(snap));
        assert_eq!(cached_snapshot(&tmp, "owner/other", None), None);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
