//! One update's whole trip at protocol level: the agent encodes, signs and chunks a delta; the
//! aggregator parses topics and manifest, checks the signature, reassembles shuffled and
//! duplicated chunks, decodes against the model spec and applies it.

use shared_proto::chunk::{split, InsertOutcome};
use shared_proto::codec::{
    apply_delta, decode_delta_with_codec, encode_delta, Codec, EncodeOptions,
};
use shared_proto::hash::sha256_hex;
use shared_proto::message::{
    decode, encode, ClientMetrics, UpdateManifest, DEFAULT_MAX_MESSAGE_LEN,
};
use shared_proto::sign::KeyPair;
use shared_proto::tensor::model_id;
use shared_proto::topic::{TopicKind, Topics};
use shared_proto::{ModelSpec, ProtoError, RejectReason, Tensor, TensorSet, PROTOCOL_VERSION};

fn model() -> TensorSet {
    let mut m = TensorSet::new();
    m.insert(
        "expert.w".into(),
        Tensor::new(
            vec![64, 48],
            (0..64 * 48).map(|i| (i as f32 * 0.37).sin()).collect(),
        )
        .unwrap(),
    );
    m.insert(
        "expert.b".into(),
        Tensor::new(vec![48], vec![0.1; 48]).unwrap(),
    );
    m
}

#[test]
fn agent_to_aggregator() {
    let topics = Topics::new("lab").unwrap();
    let global = model();
    let spec = ModelSpec::from_tensors(&global);
    let agent_key = KeyPair::generate();

    // Agent: a local training delta, top-1% with error feedback, in 1 KiB chunks.
    let delta: TensorSet = global
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                Tensor {
                    shape: t.shape.clone(),
                    data: t.data.iter().map(|x| x * 1e-3).collect(),
                },
            )
        })
        .collect();
    let mut residual = TensorSet::new();
    let codec = Codec::TopK { fraction: 0.01 };
    let blob = encode_delta(
        &delta,
        &EncodeOptions {
            codec,
            zstd_level: 3,
        },
        Some(&mut residual),
    )
    .unwrap();
    let chunk_size = 1024usize;
    let chunks: Vec<(String, Vec<u8>)> = split(&blob, chunk_size)
        .enumerate()
        .map(|(i, c)| (topics.update_chunk("robot-1", 5, i as u32), c.to_vec()))
        .collect();
    let mut manifest = UpdateManifest {
        v: PROTOCOL_VERSION,
        federation: "lab".into(),
        client_id: "robot-1".into(),
        round: 5,
        base_model_id: model_id(&global),
        codec: codec.to_string(),
        total_len: blob.len() as u64,
        chunk_count: chunks.len() as u32,
        chunk_size: chunk_size as u32,
        sha256: sha256_hex(&blob).into(),
        examples: 500,
        metrics: ClientMetrics {
            loss: 0.3,
            fedprox_loss: 0.31,
            grad_norm: 1.0,
            update_norm: 0.05,
            steps: 10,
            seconds: 3.0,
        },
        chunk_sha256: Vec::new(),
        signature: Vec::new(),
    };
    manifest.describe_blob(&blob, chunk_size as u32);
    manifest.sign_with(&agent_key);
    let manifest_msg = (topics.update_manifest("robot-1", 5), encode(&manifest));

    // Aggregator: manifest first (it may also arrive last), then chunks in reverse, twice.
    let (topic, payload) = manifest_msg;
    assert_eq!(
        topics.parse(&topic),
        Some(TopicKind::UpdateManifest {
            client_id: "robot-1".into(),
            round: 5
        })
    );
    let m: UpdateManifest = decode(&payload, DEFAULT_MAX_MESSAGE_LEN).unwrap();
    m.verify_with(&agent_key.public()).unwrap();
    assert_eq!(m.base_model_id, model_id(&global));
    let mut r = m.reassembly(1 << 20).unwrap();
    for (topic, bytes) in chunks.iter().rev().chain(chunks.iter()) {
        let Some(TopicKind::UpdateChunk { index, .. }) = topics.parse(topic) else {
            panic!("{topic}")
        };
        r.insert(index, bytes).unwrap();
    }
    assert_eq!(r.insert(0, &chunks[0].1).unwrap(), InsertOutcome::Duplicate);
    let received = r.finish().unwrap();
    let (decoded, got_codec) = decode_delta_with_codec(&received, &spec, 64 << 20).unwrap();
    assert_eq!(got_codec.to_string(), m.codec);

    // Error feedback: what was sent plus what the agent kept is exactly the delta.
    for (name, t) in &delta {
        for i in 0..t.data.len() {
            assert_eq!(decoded[name].data[i] + residual[name].data[i], t.data[i]);
        }
    }
    let kept = decoded
        .values()
        .flat_map(|t| &t.data)
        .filter(|x| **x != 0.0)
        .count();
    // ceil(1% of 3072) = 31 entries of expert.w, at least 1 of expert.b.
    assert!(kept <= 32, "top-1% per tensor, got {kept}");

    let mut new_global = global.clone();
    apply_delta(&mut new_global, &decoded, 1.0);
    assert_ne!(model_id(&new_global), model_id(&global));
}

#[test]
fn tampering_is_caught_with_the_right_reason() {
    let global = model();
    let spec = ModelSpec::from_tensors(&global);
    let blob = encode_delta(
        &global,
        &EncodeOptions {
            codec: Codec::Int8,
            zstd_level: 1,
        },
        None,
    )
    .unwrap();

    // A flipped byte in transit: hash mismatch at reassembly.
    let mut bad = blob.clone();
    bad[blob.len() / 2] ^= 0x40;
    let mut r = shared_proto::chunk::Reassembly::new(
        blob.len() as u64,
        1,
        blob.len() as u32,
        shared_proto::hash::sha256(&blob),
        1 << 20,
    )
    .unwrap();
    r.insert(0, &bad).unwrap();
    let err = r.finish().unwrap_err();
    assert_eq!(err.reject_reason(), RejectReason::HashMismatch);

    // A delta for another model: shape mismatch at decode.
    let mut other = spec.clone();
    other.tensors.insert("expert.b".into(), vec![49]);
    let err = decode_delta_with_codec(&blob, &other, 64 << 20).unwrap_err();
    assert_eq!(err.reject_reason(), RejectReason::ShapeMismatch);

    // A decompression cap below the real size: oversize.
    let err: ProtoError = decode_delta_with_codec(&blob, &spec, 1000).unwrap_err();
    assert_eq!(err.reject_reason(), RejectReason::Oversize);
}
