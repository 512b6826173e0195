//! `codec::decode_delta` on arbitrary bytes, both raw and wrapped in a valid zstd frame so the
//! safetensors and codec layers are reached. Anything accepted must match the spec.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::codec::decode_delta;
use shared_proto::ModelSpec;

fuzz_target!(|data: &[u8]| {
    let spec = ModelSpec {
        tensors: [("w".to_string(), vec![4, 3]), ("b".to_string(), vec![3]), ("s".to_string(), vec![])].into(),
    };
    for input in [data.to_vec(), zstd::bulk::compress(data, 1).unwrap_or_default()] {
        if let Ok(set) = decode_delta(&input, &spec, 1 << 20) {
            spec.validate(&set).expect("decoded delta must satisfy the spec");
        }
    }
});
