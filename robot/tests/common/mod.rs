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
