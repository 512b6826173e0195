//! ONNX exports of the federation's global models, for `zk0-agent act --follow-global`
//! (`[infer] follow_global`).
//!
//! Under `<work_dir>/exports/`: `<model_id>/`, a finished `zk0-train export-onnx` output
//! (written to `<model_id>.tmp/` and renamed once the exporter exited 0), and `current.json`
//! = `{"model_id", "dir", "round"}` naming the newest one, replaced atomically (temp file,
//! fsync, rename) after that rename, so a reader sees the old export or the new one, never a
//! half-written one. The newest [`KEEP`] exports stay (by their `export.json`'s mtime; the
//! current one always), older ones are deleted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// Exports kept (the current one among them).
pub const KEEP: usize = 2;
/// The pointer file's name in the exports directory.
pub const CURRENT: &str = "current.json";
/// The file every finished export has (`zk0-train export-onnx`'s manifest).
const MANIFEST: &str = "export.json";

/// Why an export, or reading the pointer, failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Write(#[from] zk0_daemon::Error),
    #[error("the exporter {0}")]
    Exporter(String),
    #[error("the exporter ran past {0:?} and was killed")]
    Timeout(Duration),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `current.json`: the export `act --follow-global` should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    pub model_id: String,
    /// The export directory (absolute).
    pub dir: PathBuf,
    /// The round whose announcement (or the aggregator's status) named the model.
    pub round: u64,
}

/// `<work_dir>/exports`.
pub fn exports_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("exports")
}

/// The pointer in `exports`, if there is one.
pub fn read_current(exports: &Path) -> Result<Option<Current>, ExportError> {
    let path = exports.join(CURRENT);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| ExportError::Json { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

/// One export of a global model.
#[derive(Debug, Clone)]
pub struct ExportJob {
    /// The exporter and its first arguments (`zk0-train export-onnx`).
    pub command: Vec<String>,
    /// The base checkpoint (`--model`, what training loads).
    pub model: PathBuf,
    /// `--tokenizer`, if any.
    pub tokenizer: Option<PathBuf>,
    /// The verified global model (`--global`).
    pub global: PathBuf,
    pub model_id: String,
    pub round: u64,
    /// `<work_dir>/exports`.
    pub exports: PathBuf,
    pub timeout: Duration,
}

/// Runs the exporter into `<model_id>.tmp`, then [`install`]s it. The child is killed at
/// `timeout` (and when this future is dropped).
pub async fn run(job: &ExportJob) -> Result<Current, ExportError> {
    let tmp = job.exports.join(format!("{}.tmp", job.model_id));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&job.exports).map_err(io(&job.exports))?;
    let (program, pre) = job
        .command
        .split_first()
        .ok_or_else(|| ExportError::Exporter("command is empty".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(pre).arg("--model").arg(&job.model);
    if let Some(t) = &job.tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    cmd.arg("--global")
        .arg(&job.global)
        .arg("--out")
        .arg(&tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| ExportError::Exporter(format!("{program:?} did not start: {e}")))?;
    let status = match tokio::time::timeout(job.timeout, child.wait()).await {
        Ok(s) => s.map_err(|e| ExportError::Exporter(format!("wait: {e}")))?,
        Err(_) => {
            let _ = child.kill().await;
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(ExportError::Timeout(job.timeout));
        }
    };
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ExportError::Exporter(format!("exited with {status}")));
    }
    if !tmp.join(MANIFEST).is_file() {
        return Err(ExportError::Exporter(format!(
            "wrote no {MANIFEST} in {}",
            tmp.display()
        )));
    }
    let (exports, id, round) = (job.exports.clone(), job.model_id.clone(), job.round);
    tokio::task::spawn_blocking(move || install(&exports, &id, round))
        .await
        .map_err(|e| ExportError::Exporter(format!("install task: {e}")))?
}

/// Renames `<model_id>.tmp` to `<model_id>`, points `current.json` at it, and prunes.
pub fn install(exports: &Path, model_id: &str, round: u64) -> Result<Current, ExportError> {
    let tmp = exports.join(format!("{model_id}.tmp"));
    let dir = std::path::absolute(exports.join(model_id)).map_err(io(exports))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&tmp))?;
    let current = Current {
        model_id: model_id.to_string(),
        dir,
        round,
    };
    let json = serde_json::to_vec_pretty(&current).map_err(|source| ExportError::Json {
        path: exports.join(CURRENT),
        source,
    })?;
    zk0_daemon::write_atomic(
        &exports.join(CURRENT),
        &json,
        zk0_daemon::Durability::Durable,
    )?;
    prune(exports, KEEP, model_id)?;
    Ok(current)
}

/// Deletes finished exports but the newest `keep` (by their `export.json`'s mtime) and
/// `current`; returns what it deleted. Temp directories (`*.tmp`) are left to their run.
pub fn prune(exports: &Path, keep: usize, current: &str) -> Result<Vec<PathBuf>, ExportError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(exports).map_err(io(exports))? {
        let path = entry.map_err(io(exports))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !path.is_dir() || name.ends_with(".tmp") {
            continue;
        }
        let mtime = std::fs::metadata(path.join(MANIFEST))
            .and_then(|m| m.modified())
            .ok();
        found.push((name == current, mtime, path));
    }
    // The current one first, then newest first (no manifest: oldest).
    found.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    let mut removed = Vec::new();
    for (_, _, path) in found.into_iter().skip(keep.max(1)) {
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    /// A finished export `id` whose manifest is `age_s` old.
    fn export(exports: &Path, id: &str, age_s: u64) {
        let d = exports.join(id);
        std::fs::create_dir_all(&d).unwrap();
        let f = std::fs::File::create(d.join(MANIFEST)).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
    }

    #[test]
    fn install_renames_points_current_json_at_it_and_keeps_the_newest_two() {
        let t = tempfile::tempdir().unwrap();
        let ex = exports_dir(t.path());
        assert_eq!(read_current(&ex).unwrap(), None, "no pointer yet");
        export(&ex, "a", 300);
        export(&ex, "b", 200);
        export(&ex, "c", 100);
        export(&ex, "new.tmp", 0);
        let cur = install(&ex, "new", 7).unwrap();
        assert_eq!(cur.model_id, "new");
        assert_eq!(cur.round, 7);
        assert!(cur.dir.is_absolute() && cur.dir.join(MANIFEST).is_file());
        assert_eq!(read_current(&ex).unwrap(), Some(cur));
        let mut left: Vec<String> = std::fs::read_dir(&ex)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        // The new one and the newest older one; no temp file of the pointer left behind.
        assert_eq!(left, ["c", "current.json", "new"]);
        // Installing again over an existing export replaces it.
        export(&ex, "c.tmp", 0);
        assert_eq!(install(&ex, "c", 8).unwrap().model_id, "c");
        assert_eq!(read_current(&ex).unwrap().unwrap().round, 8);
        assert!(ex.join("new").is_dir() && ex.join("c").is_dir());
    }

    #[test]
    fn prune_keeps_the_current_one_even_when_older() {
        let t = tempfile::tempdir().unwrap();
        let ex = t.path();
        export(ex, "old", 500);
        export(ex, "x", 10);
        export(ex, "y", 20);
        export(ex, "z.tmp", 30);
        let removed = prune(ex, 2, "old").unwrap();
        assert_eq!(removed, [ex.join("y")]);
        assert!(ex.join("old").is_dir() && ex.join("x").is_dir() && ex.join("z.tmp").is_dir());
    }

    #[tokio::test]
    async fn a_broken_pointer_is_an_error_and_a_failing_exporter_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let ex = t.path().join("exports");
        std::fs::create_dir_all(&ex).unwrap();
        std::fs::write(ex.join(CURRENT), b"{not json").unwrap();
        assert!(matches!(read_current(&ex), Err(ExportError::Json { .. })));
        std::fs::remove_file(ex.join(CURRENT)).unwrap();
        let job = ExportJob {
            command: vec!["false".into()],
            model: "m".into(),
            tokenizer: None,
            global: "g".into(),
            model_id: "id".into(),
            round: 1,
            exports: ex.clone(),
            timeout: Duration::from_secs(10),
        };
        let e = run(&job).await.unwrap_err();
        assert!(e.to_string().contains("exited with"), "{e}");
        let slow = ExportJob {
            // The exporter's arguments go to `sh` as positional parameters, unused.
            command: ["sh", "-c", "sleep 30", "sh"].map(String::from).to_vec(),
            timeout: Duration::from_millis(200),
            ..job
        };
        let e = run(&slow).await.unwrap_err();
        assert!(matches!(e, ExportError::Timeout(_)), "{e}");
        assert_eq!(read_current(&ex).unwrap(), None);
    }
}
