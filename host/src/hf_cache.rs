//! The local Hugging Face cache: where `hf download` (and LeRobot) put Hub repositories.
//!
//! The daemons and the demo never download a model: a Hub id given to them must already be in
//! this cache, found the way `huggingface_hub` finds it (`HF_HUB_CACHE`, else `HF_HOME/hub`,
//! else `~/.cache/huggingface/hub`). hf-hub's own `Cache::from_env` reads only `HF_HOME`.

use anyhow::{ensure, Context, Result};
use hf_hub::Cache;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The cache this process uses.
pub fn hub_cache() -> Cache {
    cache_from(std::env::var_os("HF_HUB_CACHE"))
}

fn cache_from(hf_hub_cache: Option<OsString>) -> Cache {
    match hf_hub_cache {
        Some(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
        _ => Cache::from_env(),
    }
}

/// A LeRobot checkpoint directory from `id_or_dir`: an existing directory as is, else a Hub model
/// id (`owner/name`) whose snapshot (with its `config.json`) is in [`hub_cache`].
pub fn cached_checkpoint(id_or_dir: &str) -> Result<PathBuf> {
    cached_checkpoint_in(&hub_cache(), id_or_dir)
}

/// [`cached_checkpoint`] against an explicit cache.
pub fn cached_checkpoint_in(cache: &Cache, id_or_dir: &str) -> Result<PathBuf> {
    let p = Path::new(id_or_dir);
    if p.is_dir() {
        return Ok(std::path::absolute(p)?);
    }
    ensure!(
        !id_or_dir.is_empty() && id_or_dir.split('/').count() == 2 && !p.exists(),
        "{id_or_dir:?} is neither a checkpoint directory nor a Hub id (owner/name)"
    );
    let config = cache
        .model(id_or_dir.to_string())
        .get("config.json")
        .with_context(|| {
            format!(
                "{id_or_dir} is not in the local Hugging Face cache ({}); download it first \
                 (`hf download {id_or_dir}`) or pass its directory",
                cache.path().display()
            )
        })?;
    Ok(config
        .parent()
        .context("cached config.json has no parent")?
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout `huggingface_hub` writes: refs/main names the snapshot holding the files.
    fn fake_cache(root: &Path, id: &str) -> PathBuf {
        let repo = root.join(format!("models--{}", id.replace('/', "--")));
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        snap
    }

    #[test]
    fn a_hub_id_resolves_to_its_cached_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = fake_cache(tmp.path(), "lerobot/smolvla_base");
        let cache = cache_from(Some(tmp.path().into()));
        assert_eq!(cache.path(), tmp.path());
        let dir = cached_checkpoint_in(&cache, "lerobot/smolvla_base").unwrap();
        assert_eq!(dir, snap);
    }

    #[test]
    fn a_directory_is_taken_as_is_and_anything_else_is_named_in_the_error() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf());
        let dir = cached_checkpoint_in(&cache, tmp.path().to_str().unwrap()).unwrap();
        assert_eq!(dir, tmp.path());
        let missing = cached_checkpoint_in(&cache, "owner/absent").unwrap_err();
        assert!(
            format!("{missing:#}").contains("hf download owner/absent"),
            "{missing:#}"
        );
        let bad = cached_checkpoint_in(&cache, "a/b/c").unwrap_err();
        assert!(format!("{bad:#}").contains("neither"), "{bad:#}");
    }
}
