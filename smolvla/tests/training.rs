//! Training behaviour on the LeRobot fixture: repeated AdamW steps on one batch lower the loss,
//! and the FedProx distance is the plain squared L2 distance.

use smolvla::optim::{clip_grad_norm, sq_distance, AdamW, AdamWConfig};
use smolvla::policy::read_fixture_inputs;
use smolvla::{SmolVlaPolicy, Trace};
use tch::{Device, Kind, Tensor};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/smolvla-tiny"
);

#[test]
fn adamw_steps_lower_the_loss() {
    tch::set_num_threads(1);
    let policy = SmolVlaPolicy::from_dir(FIXTURE, Device::Cpu).unwrap();
    let (batch, draws) = read_fixture_inputs(format!("{FIXTURE}/inputs.safetensors")).unwrap();
    let params = trainable(&policy);
    let mut cfg = AdamWConfig::from_policy(&policy.config);
    cfg.lr = 1e-3;
    let mut opt = AdamW::new(params.iter().map(|p| p.shallow_clone()).collect(), cfg);
    let mut losses = Vec::new();
    for _ in 0..15 {
        opt.zero_grad();
        let lo = policy
            .forward(
                &batch,
                Some(&draws["noise"]),
                Some(&draws["time"]),
                &mut Trace::off(),
            )
            .unwrap();
        lo.loss.backward();
        let _ = clip_grad_norm(&params, 10.0);
        opt.step(cfg.lr);
        losses.push(lo.loss.double_value(&[]));
    }
    assert!(losses[14] < 0.5 * losses[0], "{losses:?}");
}

#[test]
fn proximal_distance_is_squared_l2() {
    let a = vec![
        Tensor::from_slice(&[1f32, 2.0]),
        Tensor::from_slice(&[3f32]),
    ];
    let b = vec![
        Tensor::from_slice(&[0f32, 0.0]),
        Tensor::from_slice(&[1f32]),
    ];
    let d = sq_distance(&a, &b).to_kind(Kind::Double).double_value(&[]);
    assert_eq!(d, 1.0 + 4.0 + 4.0);
}

#[test]
fn save_pretrained_round_trips() {
    let policy = SmolVlaPolicy::from_dir(FIXTURE, Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("smolvla-save-{}", std::process::id()));
    policy.save_pretrained(&dir).unwrap();
    let back = SmolVlaPolicy::from_dir(&dir, Device::Cpu).unwrap();
    assert_eq!(back.config.chunk_size, policy.config.chunk_size);
    assert_eq!(back.config.image_keys(), policy.config.image_keys());
    assert_eq!(
        back.config.extra.get("device"),
        policy.config.extra.get("device")
    );
    let a = policy.named_parameters();
    let b = back.named_parameters();
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na}");
    }
    // A checkpoint with a missing key is refused, naming the key.
    let mut tensors = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    let dropped = tensors.pop().unwrap().0;
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    let err = SmolVlaPolicy::from_dir(&dir, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&dropped), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn trainable(policy: &SmolVlaPolicy) -> Vec<Tensor> {
    policy
        .trainable_parameters()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// Loss and trainable gradients of one forward/backward on the fixture batch.
fn loss_and_grads(policy: &SmolVlaPolicy, autocast: Option<Kind>) -> (f64, Vec<Tensor>) {
    let (batch, draws) = read_fixture_inputs(format!("{FIXTURE}/inputs.safetensors")).unwrap();
    let params = trainable(policy);
    let lo = smolvla::layers::autocast(autocast, || {
        policy
            .forward(
                &batch,
                Some(&draws["noise"]),
                Some(&draws["time"]),
                &mut Trace::off(),
            )
            .unwrap()
    });
    lo.loss.backward();
    let grads = params.iter().map(|p| p.grad().copy()).collect();
    (lo.loss.double_value(&[]), grads)
}

/// Under bf16 autocast every frozen matrix product already ran on the weight cast to bf16:
/// storing those weights in bf16 gives bit-identical losses and gradients, with the frozen
/// norms, embeddings and every trainable tensor left float32; saving writes float32 again.
#[test]
fn frozen_weights_in_bf16_change_nothing_under_bf16_autocast() {
    tch::set_num_threads(1);
    let plain = SmolVlaPolicy::from_dir(FIXTURE, Device::Cpu).unwrap();
    let mut reduced = SmolVlaPolicy::from_dir(FIXTURE, Device::Cpu).unwrap();
    let changed = reduced.store_frozen_as(Kind::BFloat16);
    let bf16: Vec<String> = reduced
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.kind() == Kind::BFloat16)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(bf16.len(), changed);
    assert!(
        bf16.iter().any(|n| n.ends_with("q_proj.weight")),
        "{bf16:?}"
    );
    assert!(bf16.iter().any(|n| n.ends_with("patch_embedding.weight")));
    assert!(bf16.iter().any(|n| n.ends_with("fc1.bias")));
    for n in &bf16 {
        assert!(!smolvla::policy::is_trainable(n, &reduced.config), "{n}");
        assert!(!n.contains("norm") && !n.contains("embed_tokens"), "{n}");
    }
    let (l0, g0) = loss_and_grads(&plain, Some(Kind::BFloat16));
    let (l1, g1) = loss_and_grads(&reduced, Some(Kind::BFloat16));
    assert_eq!(l0, l1);
    assert_eq!(g0.len(), g1.len());
    for (a, b) in g0.iter().zip(&g1) {
        assert!(a.equal(b));
    }
    // Without autocast the bf16-stored layers compute in bf16 (an approximation of float32).
    let (l32, _) = loss_and_grads(&plain, None);
    let (lr, _) = loss_and_grads(&reduced, None);
    assert!((l32 - lr).abs() < 2e-2 * l32.abs(), "{l32} vs {lr}");

    let dir = tempfile::tempdir().unwrap();
    reduced
        .save_weights(dir.path().join("m.safetensors"))
        .unwrap();
    let saved = Tensor::read_safetensors(dir.path().join("m.safetensors")).unwrap();
    assert!(saved.iter().all(|(_, t)| t.kind() == Kind::Float));
}
