//! Llama decoder layers: the SmolVLM2 text model (cut to `num_vlm_layers`) and the action
//! expert built from a narrowed copy of its config.

use tch::nn::{Init, Path};
use tch::Tensor;

use crate::config::ModelDims;
use crate::layers::{Linear, LlamaMlp, RmsNorm};

/// q/k/v/o projections of one layer (no biases). In the expert's cross-attention layers
/// `k_proj`/`v_proj` take the VLM's key/value states (width kv_heads·head_dim) as input.
#[derive(Debug)]
pub struct AttentionProj {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

/// One Llama decoder layer. The attention itself is done jointly over both streams by
/// [`crate::model::SmolVlmWithExpert`]; the layer provides the per-stream pieces.
#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: AttentionProj,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: LlamaMlp,
    pub head_dim: i64,
}

impl DecoderLayer {
    /// `kv_in`: input width of k_proj/v_proj (`hidden` normally, the VLM's kv width for the
    /// expert's cross-attention layers).
    pub fn new(
        vs: &Path<'_>,
        hidden: i64,
        intermediate: i64,
        heads: i64,
        kv_heads: i64,
        head_dim: i64,
        kv_in: i64,
        eps: f64,
    ) -> Self {
        let a = vs / "self_attn";
        Self {
            input_layernorm: RmsNorm::new(&(vs / "input_layernorm"), hidden, eps),
            self_attn: AttentionProj {
                q_proj: Linear::new(&(&a / "q_proj"), hidden, heads * head_dim, false),
                k_proj: Linear::new(&(&a / "k_proj"), kv_in, kv_heads * head_dim, false),
                v_proj: Linear::new(&(&a / "v_proj"), kv_in, kv_heads * head_dim, false),
                o_proj: Linear::new(&(&a / "o_proj"), heads * head_dim, hidden, false),
            },
            post_attention_layernorm: RmsNorm::new(&(vs / "post_attention_layernorm"), hidden, eps),
            mlp: LlamaMlp::new(&(vs / "mlp"), hidden, intermediate),
            head_dim,
        }
    }

    fn split_heads(&self, t: Tensor) -> Tensor {
        let s = t.size();
        t.view([s[0], s[1], -1, self.head_dim])
    }

    /// input_layernorm → q [B, L, H, D] (before RoPE).
    pub fn query(&self, x: &Tensor) -> Tensor {
        let h = self.input_layernorm.forward(x);
        self.split_heads(self.self_attn.q_proj.forward(&h))
    }

    /// input_layernorm → q, k, v [B, L, heads, D] (before RoPE).
    pub fn qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let h = self.input_layernorm.forward(x);
        (
            self.split_heads(self.self_attn.q_proj.forward(&h)),
            self.split_heads(self.self_attn.k_proj.forward(&h)),
            self.split_heads(self.self_attn.v_proj.forward(&h)),
        )
    }

    /// Cross-attention K/V: this layer's k_proj/v_proj applied to the VLM's (post-RoPE) key
    /// and value states [B, L, kv_heads, D].
    pub fn cross_kv(&self, vlm_k: &Tensor, vlm_v: &Tensor) -> (Tensor, Tensor) {
        let s = vlm_k.size();
        let flat = |t: &Tensor| t.reshape([s[0], s[1], -1]);
        (
            self.split_heads(self.self_attn.k_proj.forward(&flat(vlm_k))),
            self.split_heads(self.self_attn.v_proj.forward(&flat(vlm_v))),
        )
    }

    /// o_proj + residual, then post_attention_layernorm → MLP + residual.
    pub fn finish(&self, x: &Tensor, attn: &Tensor) -> Tensor {
        let h = self.self_attn.o_proj.forward(attn) + x;
        // LeRobot keeps the residual as a clone made before the norm; the extra autograd node
        // fixes the order in which the backward pass sums the gradients of `h`, so gradients
        // match bit for bit rather than to rounding.
        let resid = h.copy();
        self.mlp.forward(&self.post_attention_layernorm.forward(&h)) + resid
    }
}

/// `vlm.model.text_model`: token embeddings, the kept decoder layers and the final norm.
#[derive(Debug)]
pub struct TextModel {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

impl TextModel {
    pub fn new(vs: &Path<'_>, d: &ModelDims) -> Self {
        let t = &d.text;
        let layers = vs / "layers";
        Self {
            embed_tokens: (vs / "embed_tokens").var(
                "weight",
                &[t.vocab_size, t.hidden_size],
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            layers: (0..d.vlm_layers)
                .map(|i| {
                    DecoderLayer::new(
                        &(&layers / i),
                        t.hidden_size,
                        t.intermediate_size,
                        t.num_attention_heads,
                        t.kv_heads(),
                        t.head_dim(),
                        t.hidden_size,
                        t.rms_norm_eps,
                    )
                })
                .collect(),
            norm: RmsNorm::new(&(vs / "norm"), t.hidden_size, t.rms_norm_eps),
        }
    }

    /// tokens [B, L] int64 → [B, L, hidden] (unscaled).
    pub fn embed(&self, tokens: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, tokens, -1, false, false)
    }
}

/// `lm_expert`: the action expert (a narrower Llama without token embeddings).
#[derive(Debug)]
pub struct ExpertModel {
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

impl ExpertModel {
    /// `cross_layer(i)` says whether layer i's k/v projections read the VLM's K/V.
    pub fn new(vs: &Path<'_>, d: &ModelDims, cross_layer: impl Fn(i64) -> bool) -> Self {
        let t = &d.text;
        let layers = vs / "layers";
        let vlm_kv = t.kv_heads() * t.head_dim();
        Self {
            layers: (0..d.expert_layers)
                .map(|i| {
                    let kv_in = if cross_layer(i) {
                        vlm_kv
                    } else {
                        d.expert_hidden
                    };
                    DecoderLayer::new(
                        &(&layers / i),
                        d.expert_hidden,
                        d.expert_intermediate,
                        t.num_attention_heads,
                        t.kv_heads(),
                        t.head_dim(),
                        kv_in,
                        t.rms_norm_eps,
                    )
                })
                .collect(),
            norm: RmsNorm::new(&(vs / "norm"), d.expert_hidden, t.rms_norm_eps),
        }
    }
}
