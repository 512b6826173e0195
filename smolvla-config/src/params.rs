//! Which parameters train, and in which order PyTorch lists them: the rules `smolvla` applies to
//! its `VarStore` and the aggregator applies to a checkpoint's tensor names.

use crate::config::SmolVlaConfig;

/// Whether LeRobot trains `name` under the config's freeze settings
/// (`SmolVLMWithExpertModel.set_requires_grad`, `VLAFlowMatching.set_requires_grad`).
pub fn is_trainable(name: &str, cfg: &SmolVlaConfig) -> bool {
    const VLM: &str = "model.vlm_with_expert.vlm.";
    const VISION: &str = "model.vlm_with_expert.vlm.model.vision_model.";
    const TEXT: &str = "model.vlm_with_expert.vlm.model.text_model.";
    if name.starts_with("model.state_proj.") {
        return cfg.train_state_proj;
    }
    if name.starts_with("model.vlm_with_expert.lm_expert.") {
        return !name.contains("lm_head");
    }
    if !name.starts_with(VLM) {
        return true;
    }
    if cfg.freeze_vision_encoder && name.starts_with(VISION) {
        return false;
    }
    if cfg.train_expert_only {
        return false;
    }
    // Parameters that receive no gradient stay frozen: lm_head, the text model's final norm,
    // the last kept text layer (and the one before when the expert has fewer layers).
    if name.starts_with(&format!("{VLM}lm_head")) || name.starts_with(&format!("{TEXT}norm.")) {
        return false;
    }
    let mut last = vec![cfg.num_vlm_layers - 1];
    let ne = cfg.expert_layers();
    if cfg.num_vlm_layers != ne && cfg.num_vlm_layers % ne == 0 {
        last.push(cfg.num_vlm_layers - 2);
    }
    !last
        .iter()
        .any(|l| name.starts_with(&format!("{TEXT}layers.{l}.")))
}

/// Sort key giving PyTorch's module registration order for SmolVLA parameter names: each
/// path component is ranked by its position among its siblings (layer indices numerically).
pub fn module_order_key(name: &str) -> Vec<(i64, String)> {
    // Registration order of submodules/parameters; SigLIP's attention registers k, v, q, out.
    const LLAMA: &[&str] = &[
        "model",
        "vlm_with_expert",
        "vlm",
        "vision_model",
        "connector",
        "text_model",
        "lm_head",
        "lm_expert",
        "embed_tokens",
        "layers",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "mlp",
        "gate_proj",
        "up_proj",
        "down_proj",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        "modality_projection",
        "proj",
        "state_proj",
        "action_in_proj",
        "action_out_proj",
        "action_time_mlp_in",
        "action_time_mlp_out",
        "weight",
        "bias",
    ];
    const VISION: &[&str] = &[
        "embeddings",
        "patch_embedding",
        "position_embedding",
        "encoder",
        "layers",
        "self_attn",
        "k_proj",
        "v_proj",
        "q_proj",
        "out_proj",
        "layer_norm1",
        "mlp",
        "fc1",
        "fc2",
        "layer_norm2",
        "post_layernorm",
        "weight",
        "bias",
    ];
    let mut in_vision = false;
    name.split('.')
        .map(|c| {
            if let Ok(i) = c.parse::<i64>() {
                return (i, String::new());
            }
            let table = if in_vision { VISION } else { LLAMA };
            if c == "vision_model" {
                in_vision = true;
            }
            match table.iter().position(|t| *t == c) {
                Some(p) => (p as i64, String::new()),
                None => (i64::MAX, c.to_string()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lerobot/smolvla_base`'s parameter list as LeRobot reports it (names, trainable flags).
    fn manifest() -> serde_json::Map<String, serde_json::Value> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/smolvla-base-manifest.json"
        );
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        m["parameters"].as_object().unwrap().clone()
    }

    #[test]
    fn default_freeze_matches_lerobot() {
        let cfg = SmolVlaConfig::default();
        let params = manifest();
        let mut trainable = 0;
        for (name, spec) in &params {
            let want = spec["trainable"].as_bool().unwrap();
            assert_eq!(is_trainable(name, &cfg), want, "{name}");
            trainable += usize::from(want);
        }
        assert!(trainable > 10 && trainable < params.len(), "{trainable}");
    }

    #[test]
    fn freeze_settings_move_the_line() {
        let mut cfg = SmolVlaConfig::default();
        let expert = "model.vlm_with_expert.lm_expert.layers.0.mlp.up_proj.weight";
        let text0 = "model.vlm_with_expert.vlm.model.text_model.layers.0.mlp.up_proj.weight";
        let text_last = "model.vlm_with_expert.vlm.model.text_model.layers.15.mlp.up_proj.weight";
        let vision = "model.vlm_with_expert.vlm.model.vision_model.post_layernorm.weight";
        assert!(is_trainable("model.state_proj.weight", &cfg));
        assert!(!is_trainable(
            "model.vlm_with_expert.lm_expert.lm_head.weight",
            &cfg
        ));
        cfg.train_state_proj = false;
        assert!(!is_trainable("model.state_proj.weight", &cfg));
        assert!(is_trainable(expert, &cfg) && !is_trainable(text0, &cfg));
        // A full fine-tune trains the text layers but not the last one (it gets no gradient),
        // and the vision tower only when it is not frozen.
        cfg.train_expert_only = false;
        assert!(is_trainable(text0, &cfg) && !is_trainable(text_last, &cfg));
        assert!(!is_trainable(vision, &cfg));
        cfg.freeze_vision_encoder = false;
        assert!(is_trainable(vision, &cfg));
    }

    #[test]
    fn module_order_is_registration_order() {
        let mut names: Vec<&str> = vec![
            "model.action_in_proj.weight",
            "model.vlm_with_expert.lm_expert.layers.10.mlp.up_proj.weight",
            "model.vlm_with_expert.lm_expert.layers.2.self_attn.q_proj.weight",
            "model.state_proj.bias",
            "model.vlm_with_expert.vlm.model.vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "model.vlm_with_expert.vlm.model.vision_model.encoder.layers.0.self_attn.k_proj.weight",
            "model.state_proj.weight",
        ];
        names.sort_by_cached_key(|n| module_order_key(n));
        assert_eq!(
            names,
            vec![
                "model.vlm_with_expert.vlm.model.vision_model.encoder.layers.0.self_attn.k_proj.weight",
                "model.vlm_with_expert.vlm.model.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                "model.vlm_with_expert.lm_expert.layers.2.self_attn.q_proj.weight",
                "model.vlm_with_expert.lm_expert.layers.10.mlp.up_proj.weight",
                "model.state_proj.weight",
                "model.state_proj.bias",
                "model.action_in_proj.weight",
            ]
        );
    }
}
