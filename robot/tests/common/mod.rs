//! Fixture loading shared by the integration tests (each test binary uses a part of it).
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

pub fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/feetech")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn golden_cases() -> Vec<Value> {
    let cases = fixture("golden-packets.json")["cases"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(cases.len(), 49, "golden-packets.json should hold 49 cases");
    cases
}

pub fn trace() -> Value {
    fixture("lerobot-so101-trace.json")
}

pub fn bytes(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

pub fn packets(v: &Value) -> Vec<Vec<u8>> {
    v.as_array().unwrap().iter().map(bytes).collect()
}

/// The integer arguments of an SDK call such as `ph.write2ByteTxRx(port, 1, 42, 2048)  # ...`.
pub fn call_args(call: &str) -> Vec<i64> {
    let inner = call
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(args, _)| args)
        .unwrap_or("");
    inner
        .split(',')
        .filter_map(|a| {
            let a = a.trim().trim_matches(|c| c == '[' || c == ']');
            match a.strip_prefix("0x").or_else(|| a.strip_prefix("0X")) {
                Some(h) => i64::from_str_radix(h, 16).ok(),
                None => a.parse().ok(),
            }
        })
        .collect()
}

/// A port that replays scripted replies: after the n-th write it makes `replies[n]` readable
/// (or, when there are fewer writes than chunks, every chunk after the first write, as a sync
/// read's six replies follow one instruction). Reads return at once; nothing left means `Ok(0)`.
#[derive(Debug, Default)]
pub struct Scripted {
    pub replies: Vec<Vec<u8>>,
    pub all_at_once: bool,
    pub written: Vec<Vec<u8>>,
    pub rx: std::collections::VecDeque<u8>,
    pub clears: usize,
}

impl Scripted {
    pub fn new(replies: Vec<Vec<u8>>, writes: usize) -> Self {
        Self {
            all_at_once: writes != replies.len(),
            replies,
            ..Self::default()
        }
    }
}

impl zk0_robot::feetech::Transport for Scripted {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let n = self.written.len();
        self.written.push(bytes.to_vec());
        if self.all_at_once {
            if n == 0 {
                self.rx.extend(self.replies.concat());
            }
        } else if let Some(r) = self.replies.get(n) {
            self.rx.extend(r);
        }
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8], _timeout: std::time::Duration) -> std::io::Result<usize> {
        let n = buf.len().min(self.rx.len());
        for b in buf.iter_mut().take(n) {
            *b = self.rx.pop_front().unwrap();
        }
        Ok(n)
    }

    fn clear_input(&mut self) -> std::io::Result<()> {
        self.clears += 1;
        self.rx.clear();
        Ok(())
    }
}
