//! `tensor::read_safetensors` on arbitrary bytes; whatever parses must re-encode and re-read
//! to the same tensors (f32 bit patterns, so NaNs compare too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::tensor::{read_safetensors, write_safetensors};

fuzz_target!(|data: &[u8]| {
    if let Ok((set, meta)) = read_safetensors(data) {
        let (again, meta_again) = read_safetensors(&write_safetensors(&set, &meta)).expect("own output must parse");
        assert_eq!(meta_again, meta);
        assert_eq!(again.len(), set.len());
        for (name, t) in &set {
            let u = &again[name];
            assert_eq!(u.shape, t.shape);
            assert!(u.data.iter().map(|x| x.to_bits()).eq(t.data.iter().map(|x| x.to_bits())));
        }
    }
});
