//! `chunk::Reassembly` driven by an arbitrary layout and sequence of inserts: it must never
//! panic, and if it finishes, the blob must hash to the announced SHA-256 and have its length.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use shared_proto::chunk::Reassembly;
use shared_proto::hash::sha256;

#[derive(Debug, Arbitrary)]
struct Input {
    total_len: u16,
    chunk_count: u16,
    chunk_size: u16,
    real_hash: bool,
    inserts: Vec<(u16, Vec<u8>)>,
}

fuzz_target!(|input: Input| {
    let blob: Vec<u8> = (0..input.total_len).map(|i| i as u8).collect();
    let hash = if input.real_hash { sha256(&blob) } else { [7; 32] };
    let Ok(mut r) = Reassembly::new(
        u64::from(input.total_len),
        u32::from(input.chunk_count),
        u32::from(input.chunk_size),
        hash,
        1 << 16,
    ) else {
        return;
    };
    for (index, bytes) in &input.inserts {
        let _ = r.insert(u32::from(*index), bytes);
        // Also feed the true chunk, so complete blobs are reachable.
        let start = usize::from(*index) * usize::from(input.chunk_size);
        if let Some(chunk) = blob.get(start..(start + usize::from(input.chunk_size)).min(blob.len())) {
            let _ = r.insert(u32::from(*index), chunk);
        }
    }
    let total = u64::from(input.total_len);
    let complete = r.is_complete();
    assert_eq!(complete, r.missing().is_empty());
    if let Ok(out) = r.finish() {
        assert!(complete);
        assert_eq!(out.len() as u64, total);
        assert_eq!(sha256(&out), hash);
    }
});
