//! `[datasets]` in the aggregator config: the federation's client datasets and its held-out
//! evaluation datasets, as zk0's `[tool.zk0.datasets]` lists them (`clients`, `server`).
//!
//! The aggregator does not read the client datasets (each robot trains on its own); the list
//! documents the federation, goes into the model card, and lets `status` name each client's
//! dataset. Entries are Hugging Face Hub repo ids (`owner/name`) or local directories.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetsConfig {
    /// One entry per client: the dataset that client trains on.
    pub clients: Vec<DatasetEntry>,
    /// Held-out datasets for server evaluation (zk0 evaluates on the first).
    pub server: Vec<DatasetEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    /// Hub repo id (`owner/name`) or a local dataset directory.
    pub repo_id: String,
    /// The task, as LeRobot's `tasks` describe it.
    #[serde(default)]
    pub description: String,
    /// The client (agent id) that holds this dataset; empty when not yet assigned.
    #[serde(default)]
    pub client_id: String,
}

/// Whether `s` is a plausible Hub repo id: `owner/name`, each part of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-` (the Hub's own rule, simplified).
pub fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    [owner, name].iter().all(|p| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    })
}

impl DatasetsConfig {
    /// Every entry a repo id or an absolute/relative path; no dataset or client listed twice.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        let mut clients = std::collections::BTreeSet::new();
        for (list, entries) in [("clients", &self.clients), ("server", &self.server)] {
            for e in entries {
                let path_like = e.repo_id.starts_with(['/', '.']);
                if !path_like && !is_repo_id(&e.repo_id) {
                    return Err(format!(
                        "datasets.{list}: {:?} is neither a Hub repo id (owner/name) nor a path",
                        e.repo_id
                    ));
                }
                if !seen.insert((list, e.repo_id.as_str())) {
                    return Err(format!("datasets.{list}: {:?} listed twice", e.repo_id));
                }
                if !e.client_id.is_empty() && !clients.insert(e.client_id.as_str()) {
                    return Err(format!(
                        "datasets.{list}: client {:?} has two datasets",
                        e.client_id
                    ));
                }
            }
        }
        Ok(())
    }

    /// The dataset assigned to `client_id`, if listed.
    pub fn for_client(&self, client_id: &str) -> Option<&DatasetEntry> {
        self.clients.iter().find(|e| e.client_id == client_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_duplicates() {
        assert!(is_repo_id("lerobot/svla_so100_pickplace"));
        assert!(is_repo_id("KeisukeSato1024/so101_pp_green_box"));
        for bad in ["", "noslash", "a/b/c", "a/", "/b", "a/.b", "a/b c"] {
            assert!(!is_repo_id(bad), "{bad:?}");
        }
        let entry = |r: &str, c: &str| DatasetEntry {
            repo_id: r.into(),
            description: String::new(),
            client_id: c.into(),
        };
        let mut d = DatasetsConfig {
            clients: vec![entry("a/b", "r1"), entry("./local", "r2")],
            server: vec![entry("a/b", "")],
        };
        d.validate().unwrap();
        assert_eq!(d.for_client("r2").unwrap().repo_id, "./local");
        d.clients.push(entry("c/d", "r1"));
        assert!(d.validate().unwrap_err().contains("two datasets"));
        d.clients.pop();
        d.clients.push(entry("a/b", "r3"));
        assert!(d.validate().unwrap_err().contains("listed twice"));
        d.clients.pop();
        d.clients.push(entry("not a repo", ""));
        assert!(d.validate().is_err());
    }

    /// Every aggregator config the repo ships parses (no unknown keys) and validates; the zk0
    /// one lists zk0's twelve client datasets and its evaluation dataset.
    #[test]
    fn shipped_configs_parse_and_validate() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files: Vec<_> = std::fs::read_dir(root.join("configs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.push(root.join("systemd/aggregator.example.toml"));
        files.sort();
        assert!(files.len() >= 2, "{files:?}");
        for f in &files {
            let c = crate::config::Config::load(Some(f)).unwrap_or_else(|e| panic!("{e:#}"));
            c.validate()
                .unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
        }
        let zk0 =
            crate::config::Config::load(Some(&root.join("configs/zk0-federation.toml"))).unwrap();
        assert_eq!(zk0.datasets.clients.len(), 12);
        assert!(zk0
            .datasets
            .clients
            .iter()
            .all(|e| is_repo_id(&e.repo_id) && !e.description.is_empty()));
        assert_eq!(
            zk0.datasets.server[0].repo_id,
            "Hupy440/Two_Cubes_and_Two_Buckets_v2"
        );
        assert_eq!(
            zk0.datasets.for_client("zk0-client-11").unwrap().repo_id,
            "RickRain/Imperio"
        );
        assert_eq!((zk0.rounds.rounds, zk0.rounds.batch_size), (20, 16));
        assert_eq!(zk0.schedule, crate::schedule::ScheduleConfig::default());
    }
}
