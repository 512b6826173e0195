//! The building blocks of `crate::layers`, `crate::vision` and `crate::text` as ONNX nodes,
//! with the same float32 numerics: RMSNorm and softmax in float32, `finfo.min` masking, RoPE
//! by division by `10000^(2i/d)`, tanh-GELU decomposed (opset 17 has no `Gelu`).
//!
//! Weights are read by their LeRobot state-dict key from a [`Params`] and written once each.
//! Linear weights are stored transposed ([in, out], for `MatMul`); in the fp16 variant the
//! matrix products run in float16 with float32 inputs and outputs, everything else in float32.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::graph::{Attr, Elem, Graph};
use crate::{Error, Result};

/// Where the emitters read weights: the policy's variables by name, and the precision of the
/// matrix products.
pub struct Params {
    vars: HashMap<String, Tensor>,
    pub fp16: bool,
    /// Linear layers as dynamically quantized int8 products (set per graph: the prefix's).
    pub int8: bool,
}

impl Params {
    pub fn new(vars: HashMap<String, Tensor>, fp16: bool) -> Self {
        Self {
            vars,
            fp16,
            int8: false,
        }
    }

    pub fn get(&self, key: &str) -> Result<&Tensor> {
        self.vars
            .get(key)
            .ok_or_else(|| Error::Export(format!("the model has no parameter {key}")))
    }

    fn matmul_elem(&self) -> Elem {
        if self.fp16 {
            Elem::F16
        } else {
            Elem::F32
        }
    }
}

/// A float32 weight by key, as an initializer of the same name.
pub fn weight(g: &mut Graph, p: &Params, key: &str) -> Result<String> {
    g.tensor(key, p.get(key)?, Elem::F32)
}

/// `x·Wᵀ + b` for the `nn.Linear` at `prefix` (`<prefix>.weight`, optional `<prefix>.bias`).
pub fn linear(g: &mut Graph, p: &Params, prefix: &str, x: &str, bias: bool) -> Result<String> {
    // The expert's projections in the prefix graph (cross-attention K/V) stay float32, as
    // the whole expert does.
    if p.int8 && !prefix.contains(".lm_expert.") {
        return linear_int8(g, p, prefix, x, bias);
    }
    let key = format!("{prefix}.weight");
    let e = p.matmul_elem();
    let w = g.tensor(&key, &p.get(&key)?.transpose(0, 1), e)?;
    let xin = if p.fp16 {
        g.cast(x, Elem::F16)
    } else {
        x.to_string()
    };
    let mut y = g.matmul(&xin, &w);
    if bias {
        let key = format!("{prefix}.bias");
        let b = g.tensor(&key, p.get(&key)?, e)?;
        y = g.add(&y, &b);
    }
    Ok(if p.fp16 { g.cast(&y, Elem::F32) } else { y })
}

/// [`linear`] as ONNX Runtime's dynamic quantization writes it: the activations quantized per
/// call to uint8 (`DynamicQuantizeLinear`), the weights stored as int8 with one symmetric
/// scale per output column, the product in integers (`MatMulInteger`), rescaled to float32
/// and the float32 bias added. ORT fuses the pattern into one kernel (VNNI/AMX where the CPU
/// has them).
fn linear_int8(g: &mut Graph, p: &Params, prefix: &str, x: &str, bias: bool) -> Result<String> {
    let key = format!("{prefix}.weight");
    let wt = p.get(&key)?.transpose(0, 1).to_kind(Kind::Float);
    let (absmax, _) = wt.abs().max_dim(0, false);
    let scale = absmax.clamp_min(1e-12) / 127.0;
    let q = (&wt / &scale)
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    let out = q.size()[1];
    let w = g.tensor(&format!("{key}.int8"), &q, Elem::I8)?;
    let wzp = g.constant(
        &Tensor::zeros([out], (Kind::Int8, tch::Device::Cpu)),
        Elem::I8,
    )?;
    let ws = g.tensor(&format!("{key}.scale"), &scale, Elem::F32)?;
    let dq = g.op_n("DynamicQuantizeLinear", &[x], 3);
    let yi = g.op("MatMulInteger", &[&dq[0], &w, &dq[2], &wzp], vec![]);
    let yf = g.cast(&yi, Elem::F32);
    let s = g.mul(&dq[1], &ws);
    let mut y = g.mul(&yf, &s);
    if bias {
        let key = format!("{prefix}.bias");
        let b = g.tensor(&key, p.get(&key)?, Elem::F32)?;
        y = g.add(&y, &b);
    }
    Ok(y)
}

/// Llama's RMSNorm at `prefix`: `weight · x / sqrt(mean(x²) + eps)` in float32.
pub fn rms_norm(g: &mut Graph, p: &Params, prefix: &str, x: &str, eps: f64) -> Result<String> {
    let sq = g.mul(x, x);
    let var = g.op(
        "ReduceMean",
        &[&sq],
        vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
    );
    let e = g.scalar(eps as f32)?;
    let ve = g.add(&var, &e);
    let s = g.op("Sqrt", &[&ve], vec![]);
    let r = g.op("Reciprocal", &[&s], vec![]);
    let n = g.mul(x, &r);
    let w = weight(g, p, &format!("{prefix}.weight"))?;
    Ok(g.mul(&w, &n))
}

/// `nn.LayerNorm` at `prefix` over the last dimension.
pub fn layer_norm(g: &mut Graph, p: &Params, prefix: &str, x: &str, eps: f64) -> Result<String> {
    let w = weight(g, p, &format!("{prefix}.weight"))?;
    let b = weight(g, p, &format!("{prefix}.bias"))?;
    Ok(g.op(
        "LayerNormalization",
        &[x, &w, &b],
        vec![
            ("axis", Attr::Int(-1)),
            ("epsilon", Attr::Float(eps as f32)),
        ],
    ))
}

pub fn silu(g: &mut Graph, x: &str) -> String {
    let s = g.op("Sigmoid", &[x], vec![]);
    g.mul(x, &s)
}

/// torch's `gelu(approximate="tanh")`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_tanh(g: &mut Graph, x: &str) -> Result<String> {
    let x3 = {
        let x2 = g.mul(x, x);
        g.mul(&x2, x)
    };
    let k = g.scalar(0.044715)?;
    let kx3 = g.mul(&k, &x3);
    let inner = g.add(x, &kx3);
    let beta = g.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32)?;
    let arg = g.mul(&beta, &inner);
    let t = g.op("Tanh", &[&arg], vec![]);
    let one = g.scalar(1.0)?;
    let t1 = g.add(&one, &t);
    let half = g.scalar(0.5)?;
    let hx = g.mul(&half, x);
    Ok(g.mul(&hx, &t1))
}

/// Llama's gated MLP at `prefix`: `down(silu(gate(x)) · up(x))`.
pub fn llama_mlp(g: &mut Graph, p: &Params, prefix: &str, x: &str) -> Result<String> {
    let gate = linear(g, p, &format!("{prefix}.gate_proj"), x, false)?;
    let gate = silu(g, &gate);
    let up = linear(g, p, &format!("{prefix}.up_proj"), x, false)?;
    let h = g.mul(&gate, &up);
    linear(g, p, &format!("{prefix}.down_proj"), &h, false)
}

/// RoPE sin/cos tables [B, L, 1, D/2] of [`crate::layers::RopeTables`].
pub struct Rope {
    pub sin: String,
    pub cos: String,
    pub head_dim: i64,
}

/// RoPE tables computed in the graph from int64 positions [B, L], by the same float ops as
/// the tch model (the timescales are its own float32 values).
pub fn rope_from_positions(g: &mut Graph, pos: &str, head_dim: i64) -> Result<Rope> {
    let d_half = head_dim / 2;
    let exponents =
        Tensor::arange(d_half, (Kind::Float, tch::Device::Cpu)) * (2.0 / head_dim as f64);
    let timescale = Tensor::pow_scalar(10_000.0, &exponents).view([1, 1, d_half]);
    let ts = g.constant(&timescale, Elem::F32)?;
    let pf = g.cast(pos, Elem::F32);
    let pf = g.unsqueeze(&pf, &[-1])?;
    let rad = g.div(&pf, &ts);
    let rad = g.unsqueeze(&rad, &[2])?;
    Ok(Rope {
        sin: g.op("Sin", &[&rad], vec![]),
        cos: g.op("Cos", &[&rad], vec![]),
        head_dim,
    })
}

/// RoPE tables for positions known at export time, computed by tch (constants in the graph).
pub fn rope_constant(g: &mut Graph, positions: &Tensor, head_dim: i64) -> Result<Rope> {
    let d_half = head_dim / 2;
    let exponents =
        Tensor::arange(d_half, (Kind::Float, tch::Device::Cpu)) * (2.0 / head_dim as f64);
    let timescale = Tensor::pow_scalar(10_000.0, &exponents);
    let rad = positions.to_kind(Kind::Float).unsqueeze(-1) / timescale.view([1, 1, d_half]);
    let rad = rad.unsqueeze(2);
    Ok(Rope {
        sin: g.constant(&rad.sin(), Elem::F32)?,
        cos: g.constant(&rad.cos(), Elem::F32)?,
        head_dim,
    })
}

/// The half-split rotation of `apply_rope_with`: x [B, L, H, D].
pub fn apply_rope(g: &mut Graph, x: &str, r: &Rope) -> Result<String> {
    let h = r.head_dim / 2;
    let x1 = g.slice(x, 3, 0, h)?;
    let x2 = g.slice(x, 3, h, r.head_dim)?;
    let a = g.mul(&x1, &r.cos);
    let b = g.mul(&x2, &r.sin);
    let first = g.sub(&a, &b);
    let c = g.mul(&x2, &r.cos);
    let d = g.mul(&x1, &r.sin);
    let second = g.add(&c, &d);
    Ok(g.concat(&[&first, &second], -1))
}

/// Static sizes of one attention call.
pub struct AttnShape {
    pub lq: i64,
    pub lk: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
}

/// `eager_attention`: q [1, Lq, H, D], k/v [1, Lk, Hkv, D], optional bool mask [1, Lq, Lk].
/// K/V heads repeated to H, logits scaled after the product, masked entries set to the
/// float32 minimum, softmax in float32. Returns [1, Lq, H·D].
pub fn attention(
    g: &mut Graph,
    q: &str,
    k: &str,
    v: &str,
    mask: Option<&str>,
    s: &AttnShape,
) -> Result<String> {
    let groups = s.heads / s.kv_heads;
    let expand = |g: &mut Graph, t: &str| -> Result<String> {
        if groups == 1 {
            return Ok(t.to_string());
        }
        let u = g.unsqueeze(t, &[3])?;
        let e = g.expand(&u, &[1, s.lk, s.kv_heads, groups, s.head_dim])?;
        g.reshape(&e, &[1, s.lk, s.heads, s.head_dim])
    };
    let k = expand(g, k)?;
    let v = expand(g, v)?;
    let qt = g.transpose(q, &[0, 2, 1, 3]);
    let kt = g.transpose(&k, &[0, 2, 3, 1]);
    let logits = g.matmul(&qt, &kt);
    let scale = g.scalar((s.head_dim as f64).powf(-0.5) as f32)?;
    let mut logits = g.mul(&logits, &scale);
    if let Some(m) = mask {
        let m = g.unsqueeze(m, &[1])?;
        let neg = g.scalar(f32::MIN)?;
        logits = g.op("Where", &[&m, &logits, &neg], vec![]);
    }
    let probs = g.op("Softmax", &[&logits], vec![("axis", Attr::Int(-1))]);
    let vt = g.transpose(&v, &[0, 2, 1, 3]);
    let out = g.matmul(&probs, &vt);
    let out = g.transpose(&out, &[0, 2, 1, 3]);
    g.reshape(&out, &[1, s.lq, s.heads * s.head_dim])
}
