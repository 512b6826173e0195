//! The SigLIP-style vision tower of SmolVLM (transformers `SmolVLMVisionTransformer`) and the
//! pixel-shuffle connector (`SmolVLMConnector`).

use tch::nn::{Init, Path};
use tch::Tensor;

use crate::config::VisionConfig;
use crate::layers::{LayerNorm, Linear};

/// `embeddings`: Conv2d patchifier (kernel = stride = patch) plus learned position embeddings.
#[derive(Debug)]
pub struct VisionEmbeddings {
    pub patch_weight: Tensor,
    pub patch_bias: Tensor,
    pub position_embedding: Tensor,
    patch_size: i64,
}

impl VisionEmbeddings {
    pub fn new(vs: &Path<'_>, cfg: &VisionConfig) -> Self {
        let pe = vs / "patch_embedding";
        let fan_in = cfg.num_channels * cfg.patch_size * cfg.patch_size;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let patches = (cfg.image_size / cfg.patch_size).pow(2);
        Self {
            patch_weight: pe.var(
                "weight",
                &[
                    cfg.hidden_size,
                    cfg.num_channels,
                    cfg.patch_size,
                    cfg.patch_size,
                ],
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
            patch_bias: pe.var(
                "bias",
                &[cfg.hidden_size],
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
            position_embedding: (vs / "position_embedding").var(
                "weight",
                &[patches, cfg.hidden_size],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            ),
            patch_size: cfg.patch_size,
        }
    }

    /// pixels [B, C, H, W] → [B, N, hidden]. All patches are valid (LeRobot passes
    /// `patch_attention_mask=None`), so position ids are 0..N-1 in row-major order.
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let p = self.patch_size;
        let x = match crate::layers::compute_kind(&self.patch_weight, pixels) {
            None => pixels.conv2d(
                &self.patch_weight,
                Some(&self.patch_bias),
                [p, p],
                [0, 0],
                [1, 1],
                1,
            ),
            Some(k) => pixels
                .to_kind(k)
                .conv2d(
                    &self.patch_weight.to_kind(k),
                    Some(&self.patch_bias.to_kind(k)),
                    [p, p],
                    [0, 0],
                    [1, 1],
                    1,
                )
                .to_kind(pixels.kind()),
        };
        let x = x.flatten(2, -1).transpose(1, 2);
        let n = x.size()[1];
        x + self.position_embedding.narrow(0, 0, n).unsqueeze(0)
    }
}

/// Multi-head self-attention with biases, no mask.
#[derive(Debug)]
pub struct VisionAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    heads: i64,
}

impl VisionAttention {
    pub fn new(vs: &Path<'_>, cfg: &VisionConfig) -> Self {
        let h = cfg.hidden_size;
        Self {
            q_proj: Linear::new(&(vs / "q_proj"), h, h, true),
            k_proj: Linear::new(&(vs / "k_proj"), h, h, true),
            v_proj: Linear::new(&(vs / "v_proj"), h, h, true),
            out_proj: Linear::new(&(vs / "out_proj"), h, h, true),
            heads: cfg.num_attention_heads,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, l, c) = x.size3().expect("[B, L, C]");
        let hd = c / self.heads;
        let split = |t: Tensor| t.view([b, l, self.heads, hd]).transpose(1, 2);
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        // transformers runs this tower with its SDPA attention; the same kernel gives the
        // same float summation order as LeRobot.
        // Under autocast in its precision, as torch's autocast runs SDPA.
        let kind = crate::layers::autocast_kind().unwrap_or(q.kind());
        let out = Tensor::scaled_dot_product_attention(
            &q.to_kind(kind),
            &k.to_kind(kind),
            &v.to_kind(kind),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        )
        .to_kind(x.kind());
        let out = out.transpose(1, 2).reshape([b, l, c]);
        self.out_proj.forward(&out)
    }
}

/// fc1 → gelu (tanh approximation) → fc2.
#[derive(Debug)]
pub struct VisionMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl VisionMlp {
    pub fn new(vs: &Path<'_>, cfg: &VisionConfig) -> Self {
        Self {
            fc1: Linear::new(&(vs / "fc1"), cfg.hidden_size, cfg.intermediate_size, true),
            fc2: Linear::new(&(vs / "fc2"), cfg.intermediate_size, cfg.hidden_size, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).gelu("tanh"))
    }
}

/// Pre-LN encoder layer: `x + attn(LN1 x)`, then `x + mlp(LN2 x)`.
#[derive(Debug)]
pub struct VisionEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: VisionAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: VisionMlp,
}

impl VisionEncoderLayer {
    pub fn new(vs: &Path<'_>, cfg: &VisionConfig) -> Self {
        Self {
            layer_norm1: LayerNorm::new(&(vs / "layer_norm1"), cfg.hidden_size, cfg.layer_norm_eps),
            self_attn: VisionAttention::new(&(vs / "self_attn"), cfg),
            layer_norm2: LayerNorm::new(&(vs / "layer_norm2"), cfg.hidden_size, cfg.layer_norm_eps),
            mlp: VisionMlp::new(&(vs / "mlp"), cfg),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        &x + self.mlp.forward(&self.layer_norm2.forward(&x))
    }
}

/// `vision_model`: embeddings → encoder layers → post_layernorm.
#[derive(Debug)]
pub struct VisionTransformer {
    pub embeddings: VisionEmbeddings,
    pub layers: Vec<VisionEncoderLayer>,
    pub post_layernorm: LayerNorm,
}

impl VisionTransformer {
    pub fn new(vs: &Path<'_>, cfg: &VisionConfig) -> Self {
        let enc = vs / "encoder" / "layers";
        Self {
            embeddings: VisionEmbeddings::new(&(vs / "embeddings"), cfg),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| VisionEncoderLayer::new(&(&enc / i), cfg))
                .collect(),
            post_layernorm: LayerNorm::new(
                &(vs / "post_layernorm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            ),
        }
    }

    /// pixels [B, 3, S, S] in [-1, 1] → `last_hidden_state` [B, N, hidden].
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let mut x = self.embeddings.forward(pixels);
        for layer in &self.layers {
            x = layer.forward(&x);
        }
        self.post_layernorm.forward(&x)
    }
}

/// transformers' SmolVLM `pixel_shuffle`: [B, N, C] → [B, N/s², C·s²] (space to depth).
pub fn pixel_shuffle(x: &Tensor, s: i64) -> Tensor {
    let (b, n, c) = x.size3().expect("[B, N, C]");
    let side = (n as f64).sqrt() as i64;
    let x = x.view([b, side, side, c]);
    let x = x.view([b, side, side / s, c * s]).permute([0, 2, 1, 3]);
    let x = x
        .reshape([b, side / s, side / s, c * s * s])
        .permute([0, 2, 1, 3]);
    x.reshape([b, n / (s * s), c * s * s])
}

/// `connector`: pixel shuffle then `modality_projection.proj` (no bias).
#[derive(Debug)]
pub struct Connector {
    pub proj: Linear,
    scale_factor: i64,
}

impl Connector {
    pub fn new(vs: &Path<'_>, vision_hidden: i64, text_hidden: i64, scale_factor: i64) -> Self {
        let in_dim = vision_hidden * scale_factor * scale_factor;
        Self {
            proj: Linear::new(
                &(vs / "modality_projection" / "proj"),
                in_dim,
                text_hidden,
                false,
            ),
            scale_factor,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.proj.forward(&pixel_shuffle(x, self.scale_factor))
    }
}
