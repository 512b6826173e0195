//! A minimal Hugging Face Hub on loopback, for the download path of `--model owner/name` and
//! `--repo-id owner/name` without the internet: it serves a directory as one repository at
//! revision `main` and answers exactly what hf-hub 0.4's sync API asks — the repo info (file
//! list and commit), then per file a `Range: bytes=0-0` probe (commit, etag, size) and the file
//! from an offset. Every request is recorded; the server stops after a given number of
//! requests or 60 s, whichever comes first.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The commit every file is served at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A running fake Hub.
pub struct FakeHub {
    /// `http://127.0.0.1:<port>`: the `HF_ENDPOINT` to give the client.
    pub endpoint: String,
    /// The repository's files: path relative to its root (with `/`), contents.
    pub files: Vec<(String, Vec<u8>)>,
    server: JoinHandle<Vec<String>>,
}

impl FakeHub {
    /// Serves every file under `root` as repository `repo_id` of `kind` (`models` or
    /// `datasets`), for at most `max_requests` requests.
    pub fn serve(kind: &str, repo_id: &str, root: &Path, max_requests: usize) -> Result<FakeHub> {
        let mut files = Vec::new();
        collect(root, root, &mut files)?;
        files.sort();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let info = format!("/api/{kind}/{repo_id}/revision/main");
        let prefix = match kind {
            "models" => format!("/{repo_id}/resolve/main/"),
            _ => format!("/{kind}/{repo_id}/resolve/main/"),
        };
        let served = files.clone();
        let server = std::thread::spawn(move || {
            let mut asked = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while asked.len() < max_requests && Instant::now() < deadline {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => break,
                };
                if let Some(path) = answer(stream, &info, &prefix, &served) {
                    asked.push(path);
                }
            }
            asked
        });
        Ok(FakeHub {
            endpoint,
            files,
            server,
        })
    }

    /// Waits for the server to stop; the request paths it saw, in order.
    pub fn requests(self) -> Vec<String> {
        self.server.join().unwrap_or_default()
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect(root, &p, out)?;
        } else if p.is_file() {
            let rel = p.strip_prefix(root)?.to_string_lossy().replace('\\', "/");
            out.push((rel, std::fs::read(&p)?));
        }
    }
    Ok(())
}

/// Reads one request and answers it; returns its path.
fn answer(
    mut stream: std::net::TcpStream,
    info: &str,
    prefix: &str,
    files: &[(String, Vec<u8>)],
) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    // `Range: bytes=a-b` or `bytes=a-`.
    let mut range: (usize, Option<usize>) = (0, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h == "\r\n" {
            break;
        }
        if let Some(r) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = r.trim().split_once('-').unwrap_or((r.trim(), ""));
            range = (a.parse().unwrap_or(0), b.parse().ok());
        }
    }
    let (status, headers, body) = if path == info {
        let siblings: Vec<_> = files
            .iter()
            .map(|(n, _)| serde_json::json!({ "rfilename": n }))
            .collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings });
        ("200 OK", String::new(), body.to_string().into_bytes())
    } else if let Some((name, data)) = path
        .strip_prefix(prefix)
        .and_then(|n| files.iter().find(|(f, _)| f == n))
    {
        let from = range.0.min(data.len());
        let to = range
            .1
            .map_or(data.len(), |b| (b + 1).min(data.len()))
            .max(from);
        let headers = format!(
            "ETag: \"etag-{}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Range: bytes {from}-{}/{}\r\n",
            name.replace('/', "-"),
            to.saturating_sub(1),
            data.len()
        );
        ("206 Partial Content", headers, data[from..to].to_vec())
    } else {
        ("404 Not Found", String::new(), b"not found".to_vec())
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(&body);
    Some(path)
}
