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
    let params: Vec<Tensor> = policy
        .trainable_parameters()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
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
