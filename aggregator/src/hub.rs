//! Pushing a folder (a checkpoint's `pretrained_model/`) to the Hugging Face Hub through its
//! HTTP API, the way `huggingface_hub.upload_folder` does:
//!
//! 1. `POST {endpoint}/api/repos/create` (`409 Conflict`: the repo exists, fine);
//! 2. `POST {endpoint}/api/models/{repo}/preupload/{revision}` with each file's path, size and
//!    first 512 bytes: the Hub answers which files go through LFS and which to ignore;
//! 3. LFS files: `POST {endpoint}/{repo}.git/info/lfs/objects/batch` (sha256 oids), then for
//!    each object the Hub does not have, a `PUT` of the bytes to the returned URL (or the
//!    multipart parts plus the completion call), then the verify call;
//! 4. `POST {endpoint}/api/models/{repo}/commit/{revision}` with an NDJSON body: a header line,
//!    one `file` line per regular file (base64 content), one `lfsFile` line per LFS file.
//!
//! Token: `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, `$HF_HOME/token`,
//! `~/.cache/huggingface/token`); endpoint: `HF_ENDPOINT`, else `https://huggingface.co`.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// `HF_ENDPOINT` or the public Hub.
pub fn endpoint_from_env() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// `HF_TOKEN`, else the token file huggingface_hub writes on `login`.
pub fn token_from_env() -> Option<String> {
    if let Some(t) = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Some(t.trim().to_string());
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let file = env("HF_TOKEN_PATH")
        .or_else(|| env("HF_HOME").map(|h| h.join("token")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/huggingface/token")))?;
    let t = std::fs::read_to_string(file).ok()?;
    Some(t.trim().to_string()).filter(|t| !t.is_empty())
}

/// One file of the folder.
struct LocalFile {
    /// Path in the repo (`/`-separated, relative to the folder).
    path: String,
    abs: PathBuf,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
}

/// What [`push_folder`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct PushReport {
    pub repo_url: String,
    pub commit_url: String,
    pub regular: Vec<String>,
    pub lfs: Vec<String>,
    /// LFS objects the Hub already had (not uploaded again).
    pub lfs_skipped: Vec<String>,
}

/// Uploads every file under `dir` to model repo `repo_id` (created if missing) as one commit
/// on `main`.
pub fn push_folder(endpoint: &str, token: &str, repo_id: &str, dir: &Path) -> Result<PushReport> {
    anyhow::ensure!(
        crate::datasets::is_repo_id(repo_id),
        "{repo_id:?} is not a Hub repo id (owner/name)"
    );
    anyhow::ensure!(!token.is_empty(), "no Hugging Face token (set HF_TOKEN)");
    let files = scan(dir)?;
    anyhow::ensure!(!files.is_empty(), "{} has no files to push", dir.display());
    let hub = Hub {
        http: ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(600))
            .build(),
        auth: format!("Bearer {token}"),
        endpoint: endpoint.trim_end_matches('/'),
        repo_id,
        revision: "main",
    };
    let mut report = PushReport {
        repo_url: hub.create_repo()?,
        commit_url: String::new(),
        regular: Vec::new(),
        lfs: Vec::new(),
        lfs_skipped: Vec::new(),
    };
    let (regular_files, lfs_files) = hub.preupload(&files)?;
    if !lfs_files.is_empty() {
        hub.upload_lfs(&lfs_files, &mut report)?;
    }
    report.commit_url = hub.commit(&regular_files, &lfs_files, &mut report)?;
    Ok(report)
}

/// One push's connection to the Hub: the four steps of an upload, in order.
struct Hub<'a> {
    http: ureq::Agent,
    auth: String,
    endpoint: &'a str,
    repo_id: &'a str,
    revision: &'a str,
}

impl Hub<'_> {
    /// Step 1: creates the repo (a 409 means it exists); returns its URL.
    fn create_repo(&self) -> Result<String> {
        let (endpoint, repo_id) = (self.endpoint, self.repo_id);
        let (org, name) = repo_id.split_once('/').context("a repo id is owner/name")?;
        let created = self
            .http
            .post(&format!("{endpoint}/api/repos/create"))
            .set("Authorization", &self.auth)
            .send_json(
                json!({"name": name, "organization": org, "type": "model", "private": false}),
            );
        match created {
            Ok(r) => Ok(r
                .into_json::<Value>()
                .ok()
                .and_then(|v| v["url"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{endpoint}/{repo_id}"))),
            Err(ureq::Error::Status(409, _)) => Ok(format!("{endpoint}/{repo_id}")),
            Err(e) => Err(http_error(e, "creating the repo")),
        }
    }

    /// Step 2, preupload: which files go as regular files and which through LFS (ignored ones
    /// neither).
    fn preupload<'f>(
        &self,
        files: &'f [LocalFile],
    ) -> Result<(Vec<&'f LocalFile>, Vec<&'f LocalFile>)> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let listing: Vec<Value> = files
            .iter()
            .map(|f| json!({"path": f.path, "size": f.size, "sample": b64.encode(&f.sample)}))
            .collect();
        let pre: Value = self
            .http
            .post(&format!(
                "{}/api/models/{}/preupload/{}",
                self.endpoint, self.repo_id, self.revision
            ))
            .set("Authorization", &self.auth)
            .send_json(json!({ "files": listing }))
            .map_err(|e| http_error(e, "preupload"))?
            .into_json()
            .context("preupload: the answer is not JSON")?;
        let mut modes = BTreeMap::new();
        for f in pre["files"]
            .as_array()
            .context("preupload: no `files` in the answer")?
        {
            let path = f["path"].as_str().unwrap_or_default().to_string();
            let ignore = f["shouldIgnore"].as_bool().unwrap_or(false);
            let lfs = f["uploadMode"].as_str() == Some("lfs");
            modes.insert(path, (lfs, ignore));
        }
        let (mut regular, mut lfs_files) = (Vec::new(), Vec::new());
        for f in files {
            let (lfs, ignore) = *modes
                .get(&f.path)
                .with_context(|| format!("preupload: no answer for {}", f.path))?;
            match (ignore, lfs) {
                (true, _) => {}
                (false, true) => lfs_files.push(f),
                (false, false) => regular.push(f),
            }
        }
        Ok((regular, lfs_files))
    }

    /// Step 3, LFS: batch, then upload and verify what the Hub lacks.
    fn upload_lfs(&self, lfs_files: &[&LocalFile], report: &mut PushReport) -> Result<()> {
        let objects: Vec<Value> = lfs_files
            .iter()
            .map(|f| json!({"oid": f.sha256, "size": f.size}))
            .collect();
        let batch: Value = self
            .http
            .post(&format!(
                "{}/{}.git/info/lfs/objects/batch",
                self.endpoint, self.repo_id
            ))
            .set("Authorization", &self.auth)
            .set("Accept", "application/vnd.git-lfs+json")
            .set("Content-Type", "application/vnd.git-lfs+json")
            .send_string(
                &json!({
                    "operation": "upload",
                    "transfers": ["basic", "multipart"],
                    "objects": objects,
                    "hash_algo": "sha256",
                    "ref": {"name": self.revision},
                })
                .to_string(),
            )
            .map_err(|e| http_error(e, "LFS batch"))?
            .into_json()
            .context("LFS batch: the answer is not JSON")?;
        for obj in batch["objects"]
            .as_array()
            .context("LFS batch: no `objects`")?
        {
            let oid = obj["oid"].as_str().unwrap_or_default();
            let f = lfs_files
                .iter()
                .find(|f| f.sha256 == oid)
                .with_context(|| format!("LFS batch: unknown oid {oid}"))?;
            if let Some(err) = obj.get("error") {
                anyhow::bail!("LFS batch refused {}: {err}", f.path);
            }
            let Some(actions) = obj.get("actions").filter(|a| a.is_object()) else {
                report.lfs_skipped.push(f.path.clone());
                continue;
            };
            self.upload_object(f, actions)?;
            report.lfs.push(f.path.clone());
        }
        Ok(())
    }

    /// One LFS object: its upload (basic or multipart), then the verify call if asked for.
    fn upload_object(&self, f: &LocalFile, actions: &Value) -> Result<()> {
        let upload = &actions["upload"];
        let href = upload["href"]
            .as_str()
            .context("LFS batch: no upload href")?;
        let header = upload["header"].as_object().cloned().unwrap_or_default();
        if let Some(chunk) = header.get("chunk_size") {
            upload_multipart(&self.http, f, href, chunk, &header)?;
        } else {
            let mut req = self
                .http
                .put(href)
                .set("Content-Length", &f.size.to_string());
            for (k, v) in &header {
                req = req.set(k, v.as_str().unwrap_or_default());
            }
            let file = std::fs::File::open(&f.abs)?;
            req.send(file)
                .map_err(|e| http_error(e, &format!("uploading {}", f.path)))?;
        }
        if let Some(verify) = actions.get("verify") {
            let href = verify["href"].as_str().context("LFS: no verify href")?;
            let mut req = self.http.post(href).set("Authorization", &self.auth);
            for (k, v) in verify["header"].as_object().into_iter().flatten() {
                req = req.set(k, v.as_str().unwrap_or_default());
            }
            req.send_json(json!({"oid": f.sha256, "size": f.size}))
                .map_err(|e| http_error(e, &format!("verifying {}", f.path)))?;
        }
        Ok(())
    }

    /// Step 4, the commit: NDJSON, header first, regular files inline, LFS files by pointer.
    /// Returns the commit's URL.
    fn commit(
        &self,
        regular_files: &[&LocalFile],
        lfs_files: &[&LocalFile],
        report: &mut PushReport,
    ) -> Result<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut body = String::new();
        let mut line = |v: Value| {
            body.push_str(&v.to_string());
            body.push('\n');
        };
        line(json!({"key": "header", "value": {
            "summary": format!("Upload {} files with zk0-aggregator", regular_files.len() + lfs_files.len()),
            "description": "",
        }}));
        for f in regular_files {
            let bytes =
                std::fs::read(&f.abs).with_context(|| format!("reading {}", f.abs.display()))?;
            line(json!({"key": "file", "value": {
                "content": b64.encode(&bytes), "path": f.path, "encoding": "base64",
            }}));
            report.regular.push(f.path.clone());
        }
        for f in lfs_files {
            line(json!({"key": "lfsFile", "value": {
                "path": f.path, "algo": "sha256", "oid": f.sha256, "size": f.size,
            }}));
        }
        let commit: Value = self
            .http
            .post(&format!(
                "{}/api/models/{}/commit/{}",
                self.endpoint, self.repo_id, self.revision
            ))
            .set("Authorization", &self.auth)
            .set("Content-Type", "application/x-ndjson")
            .send_string(&body)
            .map_err(|e| http_error(e, "commit"))?
            .into_json()
            .context("commit: the answer is not JSON")?;
        Ok(commit["commitUrl"].as_str().unwrap_or_default().to_string())
    }
}

/// Multipart LFS upload: the batch answer's header holds `chunk_size` and one presigned URL
/// per part (keys `1`, `2`, … as zero-padded numbers); each part's ETag goes to the
/// completion URL (`href`).
fn upload_multipart(
    http: &ureq::Agent,
    f: &LocalFile,
    href: &str,
    chunk: &Value,
    header: &serde_json::Map<String, Value>,
) -> Result<()> {
    let chunk_size: u64 = match chunk {
        Value::String(s) => s.parse().ok(),
        v => v.as_u64(),
    }
    .filter(|c| *c > 0)
    .context("LFS multipart: bad chunk_size")?;
    let mut parts: Vec<(u64, &str)> = header
        .iter()
        .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()?)))
        .collect();
    parts.sort();
    anyhow::ensure!(
        parts.len() as u64 == f.size.div_ceil(chunk_size),
        "LFS multipart: {} part URLs for {} bytes in chunks of {chunk_size}",
        parts.len(),
        f.size
    );
    let mut file = std::fs::File::open(&f.abs)?;
    let mut etags = Vec::new();
    for (i, (n, url)) in parts.iter().enumerate() {
        let start = i as u64 * chunk_size;
        let len = chunk_size.min(f.size - start);
        file.seek(SeekFrom::Start(start))?;
        let resp = http
            .put(url)
            .set("Content-Length", &len.to_string())
            .send((&mut file).take(len))
            .map_err(|e| http_error(e, &format!("uploading part {n} of {}", f.path)))?;
        let etag = resp
            .header("ETag")
            .with_context(|| format!("part {n} of {}: no ETag", f.path))?
            .to_string();
        etags.push(json!({"partNumber": n, "etag": etag}));
    }
    http.post(href)
        .send_json(json!({"oid": f.sha256, "parts": etags}))
        .map_err(|e| http_error(e, &format!("completing the upload of {}", f.path)))?;
    Ok(())
}

/// Every regular file under `dir` (sorted; hidden entries skipped), hashed.
fn scan(dir: &Path) -> Result<Vec<LocalFile>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let p = e.path();
            let ty = e.file_type()?;
            if ty.is_dir() {
                stack.push(p);
            } else if ty.is_file() {
                let rel = p.strip_prefix(dir).expect("under dir");
                let path = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                let (size, sha256, sample) = hash_file(&p)?;
                out.push(LocalFile {
                    path,
                    abs: p,
                    size,
                    sha256,
                    sample,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Size, SHA-256 (hex) and the first 512 bytes, in one streaming pass.
fn hash_file(p: &Path) -> Result<(u64, String, Vec<u8>)> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut sample) = (0u64, Vec::new());
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if sample.len() < 512 {
            let take = (512 - sample.len()).min(n);
            sample.extend_from_slice(&buf[..take]);
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((size, hex, sample))
}

fn http_error(e: ureq::Error, what: &str) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            let url = r.get_url().to_string();
            let body = r.into_string().unwrap_or_default();
            let body: String = body.chars().take(500).collect();
            anyhow::anyhow!("Hub {what}: HTTP {code} from {url}: {body}")
        }
        e => anyhow::anyhow!("Hub {what}: {e}"),
    }
}
