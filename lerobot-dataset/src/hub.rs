//! Datasets on the Hugging Face Hub, resolved into hf-hub's local cache (`HF_HOME`,
//! `HF_HUB_CACHE`), so `--repo-id user/name` works like a directory. With `HF_HUB_OFFLINE=1` only
//! the cache is consulted, as in LeRobot.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{DatasetError, Result};

fn repo(repo_id: &str, revision: Option<&str>) -> Repo {
    Repo::with_revision(
        repo_id.to_string(),
        RepoType::Dataset,
        revision.unwrap_or("main").to_string(),
    )
}

/// The snapshot directory of a dataset already in the cache at `cache_dir`, if it is complete
/// enough to open (its `meta/info.json` is there).
pub fn cached_snapshot(cache_dir: &Path, repo_id: &str, revision: Option<&str>) -> Option<PathBuf> {
    let info = Cache::new(cache_dir.to_path_buf())
        .repo(repo(repo_id, revision))
        .get("meta/info.json")?;
    Some(info.parent()?.parent()?.to_path_buf())
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Downloads (or finds in the cache) every file of dataset `repo_id` and returns its local root.
pub fn resolve(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    // hf-hub reads HF_HOME; HF_HUB_CACHE (which the Python tools honour too) overrides it.
    let hub_cache = std::env::var_os("HF_HUB_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let cache = hub_cache
        .clone()
        .map(Cache::new)
        .unwrap_or_else(Cache::from_env);
    if offline() {
        return cached_snapshot(cache.path(), repo_id, revision).ok_or_else(|| {
            DatasetError::Hub(format!(
                "{repo_id}: not in the cache at {} and HF_HUB_OFFLINE is set",
                cache.path().display()
            ))
        });
    }
    let hub = |e: &dyn std::fmt::Display| DatasetError::Hub(format!("{repo_id}: {e}"));
    let mut builder = ApiBuilder::from_env().with_progress(false);
    if let Some(dir) = hub_cache {
        builder = builder.with_cache_dir(dir);
    }
    let api = builder.build().map_err(|e| hub(&e))?;
    let r = api.repo(repo(repo_id, revision));
    let info = r.info().map_err(|e| hub(&e))?;
    let mut root = None;
    for s in &info.siblings {
        let path = r
            .get(&s.rfilename)
            .map_err(|e| hub(&format!("{}: {e}", s.rfilename)))?;
        if s.rfilename == "meta/info.json" {
            root = path.parent().and_then(Path::parent).map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| DatasetError::Hub(format!("{repo_id}: no meta/info.json in the repository")))
}
