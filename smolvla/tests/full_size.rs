//! The full-size architecture (`lerobot/smolvla_base`: SmolVLM2-500M backbone cut to 16 layers)
//! against the manifest derived from LeRobot: every name, shape and trainable flag, and the totals.

use smolvla::policy::is_trainable;
use smolvla::{SmolVlaConfig, SmolVlaPolicy, VlmConfig};
use tch::Device;

const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/smolvla-base-manifest.json"
);

#[test]
fn full_size_matches_the_lerobot_manifest() {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(MANIFEST).unwrap()).unwrap();
    // The built-in SmolVLM2-500M description must equal the manifest's backbone config.
    let from_manifest: VlmConfig = serde_json::from_value(m["vlm_config"].clone()).unwrap();
    let builtin = VlmConfig::smolvlm2_500m();
    assert_eq!(
        from_manifest.text_config.hidden_size,
        builtin.text_config.hidden_size
    );
    assert_eq!(
        from_manifest.vision_config.hidden_size,
        builtin.vision_config.hidden_size
    );
    assert_eq!(from_manifest.scale_factor, builtin.scale_factor);

    tch::set_num_threads(1);
    let policy = SmolVlaPolicy::new(SmolVlaConfig::default(), builtin, Device::Cpu).unwrap();
    let params = m["parameters"].as_object().unwrap();
    let ours = policy.named_parameters();
    assert_eq!(ours.len() as u64, m["num_tensors"].as_u64().unwrap());
    for (name, t) in &ours {
        let spec = params
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in the manifest"));
        let shape: Vec<i64> = serde_json::from_value(spec["shape"].clone()).unwrap();
        assert_eq!(t.size(), shape, "{name}");
        assert_eq!(
            is_trainable(name, &policy.config),
            spec["trainable"].as_bool().unwrap(),
            "{name}"
        );
        assert_eq!(
            t.requires_grad(),
            spec["trainable"].as_bool().unwrap(),
            "{name}"
        );
    }
    let (total, trainable) = policy.num_parameters();
    assert_eq!(total, m["total_parameters"].as_i64().unwrap());
    assert_eq!(trainable, m["trainable_parameters"].as_i64().unwrap());
}

/// One training step of the full-size model on CPU (~25 s on 2 cores).
#[test]
fn full_size_training_step_runs_on_cpu() {
    use smolvla::optim::{clip_grad_norm, AdamW, AdamWConfig};
    use smolvla::{Batch, Trace};
    use tch::{Kind, Tensor};
    let mut cfg: SmolVlaConfig = serde_json::from_value(serde_json::json!({
        "input_features": {
            "observation.state": {"type": "STATE", "shape": [6]},
            "observation.images.front": {"type": "VISUAL", "shape": [3, 480, 640]}
        },
        "output_features": {"action": {"type": "ACTION", "shape": [6]}}
    }))
    .unwrap();
    cfg.chunk_size = 50;
    let policy = SmolVlaPolicy::new(cfg, VlmConfig::smolvlm2_500m(), Device::Cpu).unwrap();
    let mut batch = Batch::new();
    let opts = (Kind::Float, Device::Cpu);
    batch.insert(
        "observation.images.front".into(),
        Tensor::rand([1, 3, 480, 640], opts),
    );
    batch.insert("observation.state".into(), Tensor::randn([1, 6], opts));
    batch.insert("action".into(), Tensor::randn([1, 50, 6], opts));
    batch.insert(
        "action_is_pad".into(),
        Tensor::zeros([1, 50], (Kind::Bool, Device::Cpu)),
    );
    batch.insert(
        "observation.language.tokens".into(),
        Tensor::randint(49_000, [1, 10], (Kind::Int64, Device::Cpu)),
    );
    batch.insert(
        "observation.language.attention_mask".into(),
        Tensor::ones([1, 10], (Kind::Bool, Device::Cpu)),
    );
    let params: Vec<Tensor> = policy
        .trainable_parameters()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let cfg = AdamWConfig::from_policy(&policy.config);
    let mut opt = AdamW::new(params.iter().map(|p| p.shallow_clone()).collect(), cfg);
    let lo = policy
        .forward(&batch, None, None, &mut Trace::off())
        .unwrap();
    lo.loss.backward();
    let gn = clip_grad_norm(&params, 10.0).double_value(&[]);
    opt.step(cfg.lr);
    assert!(lo.loss.double_value(&[]).is_finite() && gn.is_finite() && gn > 0.0);
}
