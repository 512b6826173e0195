//! `zk0-aggregator push` against a local HTTP server that plays the Hugging Face Hub and
//! checks every request: the auth header, the paths, the LFS oids and sizes, the uploaded
//! bytes (basic and multipart), and the NDJSON commit.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct Hub {
    requests: Vec<Req>,
    created: bool,
    /// LFS objects stored: oid → bytes.
    objects: BTreeMap<String, Vec<u8>>,
    /// Multipart parts received: (oid, part) → bytes.
    parts: BTreeMap<(String, u64), Vec<u8>>,
    commits: Vec<String>,
}

fn read_req(s: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut line = String::new();
    s.read_line(&mut line).ok()?;
    let mut it = line.split_whitespace();
    let (method, path) = (it.next()?.to_string(), it.next()?.to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        s.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let mut body = Vec::new();
    if let Some(n) = headers.get("content-length") {
        body.resize(n.parse().ok()?, 0);
        s.read_exact(&mut body).ok()?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        loop {
            let mut sz = String::new();
            s.read_line(&mut sz).ok()?;
            let n = usize::from_str_radix(sz.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            s.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(Req {
        method,
        path,
        headers,
        body,
    })
}

fn respond(s: &mut TcpStream, code: u16, body: &Value, extra: &str) {
    let b = body.to_string();
    let _ = write!(
        s,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{b}",
        b.len()
    );
}

fn sha_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn serve(hub: Arc<Mutex<Hub>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    let b = base.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(stream) = conn else { return };
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut w = stream;
            let Some(req) = read_req(&mut r) else {
                continue;
            };
            let mut h = hub.lock().unwrap();
            h.requests.push(req.clone());
            let repo = "/api/models/lab/zk0-smolvla";
            match (req.method.as_str(), req.path.as_str()) {
                ("POST", "/api/repos/create") => {
                    if h.created {
                        respond(&mut w, 409, &json!({"error": "exists"}), "");
                    } else {
                        h.created = true;
                        respond(
                            &mut w,
                            200,
                            &json!({"url": format!("{b}/lab/zk0-smolvla")}),
                            "",
                        );
                    }
                }
                ("POST", p) if p == format!("{repo}/preupload/main") => {
                    let v: Value = serde_json::from_slice(&req.body).unwrap();
                    let files: Vec<Value> = v["files"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| {
                            let path = f["path"].as_str().unwrap();
                            let lfs = path.ends_with(".safetensors");
                            json!({"path": path, "uploadMode": if lfs {"lfs"} else {"regular"},
                                   "shouldIgnore": path == "ignored.log"})
                        })
                        .collect();
                    respond(&mut w, 200, &json!({ "files": files }), "");
                }
                ("POST", "/lab/zk0-smolvla.git/info/lfs/objects/batch") => {
                    let v: Value = serde_json::from_slice(&req.body).unwrap();
                    assert_eq!(v["operation"], "upload");
                    let objs: Vec<Value> = v["objects"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|o| {
                            let oid = o["oid"].as_str().unwrap();
                            let size = o["size"].as_u64().unwrap();
                            if h.objects.contains_key(oid) {
                                return json!({"oid": oid, "size": size});
                            }
                            let upload = if size > 1500 {
                                // Multipart: 1024-byte parts, zero-padded part keys.
                                let mut header = json!({"chunk_size": "1024"});
                                for n in 1..=size.div_ceil(1024) {
                                    header[format!("{n:05}")] =
                                        json!(format!("{b}/part/{oid}/{n}"));
                                }
                                json!({"href": format!("{b}/complete/{oid}"), "header": header})
                            } else {
                                json!({"href": format!("{b}/upload/{oid}"),
                                       "header": {"X-Upload-Token": "presigned"}})
                            };
                            json!({"oid": oid, "size": size, "actions": {
                                "upload": upload,
                                "verify": {"href": format!("{b}/verify/{oid}")}}})
                        })
                        .collect();
                    respond(&mut w, 200, &json!({ "objects": objs }), "");
                }
                ("PUT", p) if p.starts_with("/upload/") => {
                    let oid = p["/upload/".len()..].to_string();
                    h.objects.insert(oid, req.body.clone());
                    respond(&mut w, 200, &json!({}), "");
                }
                ("PUT", p) if p.starts_with("/part/") => {
                    let (oid, n) = p["/part/".len()..].split_once('/').unwrap();
                    let n: u64 = n.parse().unwrap();
                    h.parts.insert((oid.to_string(), n), req.body.clone());
                    respond(&mut w, 200, &json!({}), &format!("ETag: \"etag-{n}\"\r\n"));
                }
                ("POST", p) if p.starts_with("/complete/") => {
                    let oid = p["/complete/".len()..].to_string();
                    let v: Value = serde_json::from_slice(&req.body).unwrap();
                    assert_eq!(v["oid"], oid.as_str());
                    let mut all = Vec::new();
                    for (i, part) in v["parts"].as_array().unwrap().iter().enumerate() {
                        let n = part["partNumber"].as_u64().unwrap();
                        assert_eq!(n, i as u64 + 1);
                        assert_eq!(part["etag"], format!("\"etag-{n}\""));
                        all.extend_from_slice(&h.parts[&(oid.clone(), n)]);
                    }
                    h.objects.insert(oid, all);
                    respond(&mut w, 200, &json!({}), "");
                }
                ("POST", p) if p.starts_with("/verify/") => {
                    let oid = &p["/verify/".len()..];
                    let ok = h.objects.get(oid).is_some_and(|b| sha_hex(b) == oid);
                    respond(&mut w, if ok { 200 } else { 422 }, &json!({}), "");
                }
                ("POST", p) if p == format!("{repo}/commit/main") => {
                    h.commits.push(String::from_utf8(req.body.clone()).unwrap());
                    respond(
                        &mut w,
                        200,
                        &json!({"commitUrl": format!("{b}/lab/zk0-smolvla/commit/abc")}),
                        "",
                    );
                }
                _ => respond(&mut w, 404, &json!({"error": "not found"}), ""),
            }
        }
    });
    base
}

fn push(endpoint: &str, dir: &Path, env: &[(&str, &str)]) -> Output {
    let empty = dir.parent().unwrap().join("empty-home");
    std::fs::create_dir_all(&empty).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_zk0-aggregator"));
    c.args(["push", "--repo", "lab/zk0-smolvla", "--dir"])
        .arg(dir)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env("HF_HOME", &empty)
        .env("HOME", &empty);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn push_creates_uploads_lfs_and_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pretrained_model");
    std::fs::create_dir_all(dir.join("nested")).unwrap();
    let model: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let small: Vec<u8> = (0..600u32).map(|i| (i * 13 % 251) as u8).collect();
    let files: BTreeMap<&str, Vec<u8>> = [
        ("model.safetensors", model.clone()),
        ("small.safetensors", small.clone()),
        ("config.json", b"{\"type\": \"smolvla\"}".to_vec()),
        ("README.md", b"# zk0 SmolVLA\n".to_vec()),
        ("nested/notes.txt", b"round 5\n".to_vec()),
        ("ignored.log", b"noise".to_vec()),
    ]
    .into_iter()
    .collect();
    for (p, b) in &files {
        std::fs::write(dir.join(p), b).unwrap();
    }
    std::fs::write(dir.join(".hidden"), b"never pushed").unwrap();

    let hub = Arc::new(Mutex::new(Hub::default()));
    let ep = serve(hub.clone());

    let o = push(&ep, &dir, &[("HF_TOKEN", "hf_test_token")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("pushed 3 regular and 2 LFS files (0 already on the Hub)"),
        "{}",
        text(&o)
    );
    {
        let h = hub.lock().unwrap();
        let paths: Vec<String> = h
            .requests
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert_eq!(paths[0], "POST /api/repos/create");
        assert_eq!(paths[1], "POST /api/models/lab/zk0-smolvla/preupload/main");
        assert_eq!(paths[2], "POST /lab/zk0-smolvla.git/info/lfs/objects/batch");
        assert_eq!(
            paths.last().unwrap(),
            "POST /api/models/lab/zk0-smolvla/commit/main"
        );
        for r in &h.requests {
            let to_storage = r.path.starts_with("/upload/")
                || r.path.starts_with("/part/")
                || r.path.starts_with("/complete/");
            let auth = r.headers.get("authorization").map(String::as_str);
            if to_storage {
                assert_eq!(auth, None, "token leaked to storage: {}", r.path);
            } else {
                assert_eq!(auth, Some("Bearer hf_test_token"), "{}", r.path);
            }
        }
        let create: Value = serde_json::from_slice(&h.requests[0].body).unwrap();
        assert_eq!(
            (create["organization"].as_str(), create["name"].as_str()),
            (Some("lab"), Some("zk0-smolvla"))
        );
        // Preupload lists every non-hidden file with its size and a base64 sample.
        let pre: Value = serde_json::from_slice(&h.requests[1].body).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let listed: BTreeMap<String, (u64, Vec<u8>)> = pre["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["path"].as_str().unwrap().to_string(),
                    (
                        f["size"].as_u64().unwrap(),
                        b64.decode(f["sample"].as_str().unwrap()).unwrap(),
                    ),
                )
            })
            .collect();
        assert_eq!(
            listed.keys().map(String::as_str).collect::<Vec<_>>(),
            files.keys().copied().collect::<Vec<_>>()
        );
        assert_eq!(listed["model.safetensors"], (3000, model[..512].to_vec()));
        // Basic upload (with the batch's header) and multipart both delivered the exact bytes.
        let basic = h
            .requests
            .iter()
            .find(|r| r.path.starts_with("/upload/"))
            .unwrap();
        assert_eq!(
            basic.headers.get("x-upload-token").map(String::as_str),
            Some("presigned")
        );
        assert_eq!(h.objects[&sha_hex(&model)], model);
        assert_eq!(h.objects[&sha_hex(&small)], small);
        assert_eq!(h.parts.len(), 3, "3000 bytes in 1024-byte parts");
        assert_eq!(
            h.requests
                .iter()
                .filter(|r| r.path.starts_with("/verify/"))
                .count(),
            2
        );
        // The commit: header, regular files inline, LFS files by oid.
        let lines: Vec<Value> = h.commits[0]
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["key"], "header");
        assert!(lines[0]["value"]["summary"]
            .as_str()
            .unwrap()
            .contains("zk0"));
        let mut regular = BTreeMap::new();
        let mut lfs = BTreeMap::new();
        for l in &lines[1..] {
            let v = &l["value"];
            let p = v["path"].as_str().unwrap().to_string();
            match l["key"].as_str().unwrap() {
                "file" => {
                    assert_eq!(v["encoding"], "base64");
                    regular.insert(p, b64.decode(v["content"].as_str().unwrap()).unwrap());
                }
                "lfsFile" => {
                    assert_eq!(v["algo"], "sha256");
                    lfs.insert(
                        p,
                        (
                            v["oid"].as_str().unwrap().to_string(),
                            v["size"].as_u64().unwrap(),
                        ),
                    );
                }
                k => panic!("unexpected commit line {k}"),
            }
        }
        for p in ["config.json", "README.md", "nested/notes.txt"] {
            assert_eq!(regular[p], files[p], "{p}");
        }
        assert_eq!(
            regular.len(),
            3,
            "ignored.log and .hidden are not committed"
        );
        assert_eq!(lfs["model.safetensors"], (sha_hex(&model), 3000));
        assert_eq!(lfs["small.safetensors"], (sha_hex(&small), 600));
    }

    // Again, with the token from the token file: the repo exists (409), the objects too.
    let home = tmp.path().join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), "hf_file_token\n").unwrap();
    let before = hub.lock().unwrap().requests.len();
    let o = push(&ep, &dir, &[("HF_HOME", home.to_str().unwrap())]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(2 already on the Hub)"), "{}", text(&o));
    let h = hub.lock().unwrap();
    let again = &h.requests[before..];
    assert!(again
        .iter()
        .all(|r| !r.path.starts_with("/upload/") && !r.path.starts_with("/part/")));
    assert!(again.iter().all(
        |r| r.headers.get("authorization").map(String::as_str) == Some("Bearer hf_file_token")
    ));
    assert_eq!(h.commits.len(), 2);
}

#[test]
fn push_without_token_or_refused_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "x").unwrap();
    let o = push("http://127.0.0.1:9", &dir, &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no Hugging Face token"), "{}", text(&o));
    // A refusing Hub: the error names the call and the status.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(s) = c else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let _ = read_req(&mut r);
            let mut w = s;
            respond(&mut w, 401, &json!({"error": "Invalid credentials"}), "");
        }
    });
    let o = push(&ep, &dir, &[("HF_TOKEN", "bad")]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("creating the repo")
            && t.contains("HTTP 401")
            && t.contains("Invalid credentials"),
        "{t}"
    );
}
