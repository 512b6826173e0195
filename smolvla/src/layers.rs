//! Building blocks shared by the vision tower, the text model and the action expert, with the
//! exact numerics of LeRobot/transformers (float32 softmax, `finfo.min` masking, RoPE base 10000).

use std::cell::Cell;

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

thread_local! {
    /// Reduced precision for the matrix products of this thread, set by [`autocast`].
    static AUTOCAST: Cell<Option<Kind>> = const { Cell::new(None) };
}

/// Runs `f` with the linear layers and the patch convolution computed in `kind` (e.g.
/// `Kind::BFloat16`), like torch's autocast does for its lower-precision op list; inputs and
/// weights are cast per call, results come back as float32 so that norms, softmax, RoPE and the
/// loss keep LeRobot's float32 numerics, and the float32 master weights receive the gradients.
/// `None` (or `Kind::Float`) runs in full precision. Nests; the previous setting is restored.
/// libtorch's own autocast is not used: tch exposes only the CUDA one, with float16.
pub fn autocast<T>(kind: Option<Kind>, f: impl FnOnce() -> T) -> T {
    let kind = kind.filter(|k| *k != Kind::Float);
    let prev = AUTOCAST.with(|c| c.replace(kind));
    // Restore even if `f` unwinds, so a caught panic cannot leave the thread in bf16.
    struct Restore(Option<Kind>);
    impl Drop for Restore {
        fn drop(&mut self) {
            AUTOCAST.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(prev);
    f()
}

/// The reduced precision set by [`autocast`] on this thread, if any.
pub fn autocast_kind() -> Option<Kind> {
    AUTOCAST.with(Cell::get)
}

/// `a @ b`, in [`autocast`]'s precision when one is set (torch's autocast lists `matmul`
/// among its lower-precision ops), the result back in `a`'s dtype.
pub fn autocast_matmul(a: &Tensor, b: &Tensor) -> Tensor {
    match autocast_kind() {
        None => a.matmul(b),
        Some(k) => a.to_kind(k).matmul(&b.to_kind(k)).to_kind(a.kind()),
    }
}

/// The precision a layer with `weight` computes in for input `x`: [`autocast`]'s, else the
/// weight's own when it is stored reduced ([`crate::SmolVlaPolicy::store_frozen_as`]), else
/// `None` (the input's, float32).
pub fn compute_kind(weight: &Tensor, x: &Tensor) -> Option<Kind> {
    autocast_kind().or_else(|| {
        let k = weight.kind();
        (k != x.kind()).then_some(k)
    })
}

/// `nn.Linear` with the checkpoint's `weight` [out, in] / optional `bias` [out].
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vs: &Path<'_>, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        // torch's default nn.Linear init bound, so a randomly initialised model trains sanely.
        let bound = 1.0 / (in_dim.max(1) as f64).sqrt();
        let weight = vs.var(
            "weight",
            &[out_dim, in_dim],
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let bias = bias.then(|| {
            vs.var(
                "bias",
                &[out_dim],
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )
        });
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match compute_kind(&self.weight, x) {
            None => x.linear(&self.weight, self.bias.as_ref()),
            Some(k) => {
                let bias = self.bias.as_ref().map(|b| b.to_kind(k));
                x.to_kind(k)
                    .linear(&self.weight.to_kind(k), bias.as_ref())
                    .to_kind(x.kind())
            }
        }
    }
}

/// Llama's RMSNorm: computed in float32, `weight * x / sqrt(mean(x²) + eps)`.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(vs: &Path<'_>, dim: i64, eps: f64) -> Self {
        Self {
            weight: vs.var("weight", &[dim], Init::Const(1.0)),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dtype = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = &xf * (var + self.eps).rsqrt();
        &self.weight * normed.to_kind(dtype)
    }
}

/// `nn.LayerNorm` over the last dimension with weight and bias.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(vs: &Path<'_>, dim: i64, eps: f64) -> Self {
        Self {
            weight: vs.var("weight", &[dim], Init::Const(1.0)),
            bias: vs.var("bias", &[dim], Init::Const(0.0)),
            eps,
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// Llama's gated MLP: `down(silu(gate(x)) * up(x))`, no biases.
#[derive(Debug)]
pub struct LlamaMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl LlamaMlp {
    pub fn new(vs: &Path<'_>, hidden: i64, intermediate: i64) -> Self {
        Self {
            gate_proj: Linear::new(&(vs / "gate_proj"), hidden, intermediate, false),
            up_proj: Linear::new(&(vs / "up_proj"), hidden, intermediate, false),
            down_proj: Linear::new(&(vs / "down_proj"), intermediate, hidden, false),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

/// SmolVLA's `apply_rope`: x [B, L, H, D], positions [B, L]; half-split rotation in float32
/// with the hard-coded base 10000 (the backbone config's rope theta is not used).
pub fn apply_rope(x: &Tensor, positions: &Tensor) -> Tensor {
    apply_rope_with(x, &RopeTables::new(positions, x.size()[3]))
}

/// The sin/cos of [`apply_rope`] for one position tensor and head dim, computed once and shared
/// by every layer and stream that rotates at those positions (the same ops, so the same values).
#[derive(Debug)]
pub struct RopeTables {
    sin: Tensor,
    cos: Tensor,
    head_dim: i64,
}

impl RopeTables {
    /// positions [B, L] → tables for x [B, L, H, `head_dim`].
    pub fn new(positions: &Tensor, head_dim: i64) -> Self {
        let d_half = head_dim / 2;
        let exponents =
            Tensor::arange(d_half, (Kind::Float, positions.device())) * (2.0 / head_dim as f64);
        let timescale = Tensor::pow_scalar(10_000.0, &exponents);
        let radians = positions.to_kind(Kind::Float).unsqueeze(-1) / timescale.view([1, 1, d_half]);
        let radians = radians.unsqueeze(2);
        Self {
            sin: radians.sin(),
            cos: radians.cos(),
            head_dim,
        }
    }
}

/// [`apply_rope`] with precomputed tables (`tables.head_dim` must be x's last dimension).
pub fn apply_rope_with(x: &Tensor, tables: &RopeTables) -> Tensor {
    let d_half = tables.head_dim / 2;
    let (sin, cos) = (&tables.sin, &tables.cos);
    let dtype = x.kind();
    let x = x.to_kind(Kind::Float);
    let x1 = x.narrow(-1, 0, d_half);
    let x2 = x.narrow(-1, d_half, d_half);
    let out = Tensor::cat(&[&x1 * cos - &x2 * sin, &x2 * cos + &x1 * sin], -1);
    out.to_kind(dtype)
}

/// LeRobot's `eager_attention_forward`: q [B, Lq, H, D], k/v [B, Lk, Hkv, D], mask [B, Lq, Lk]
/// (bool). K/V heads are repeated to H; logits in float32, masked entries set to the float32
/// minimum (a fully masked row gives a uniform softmax, not NaN). Returns [B, Lq, H·D].
pub fn eager_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: i64,
    kv_heads: i64,
) -> Tensor {
    let (b, lk, _, d) = k.size4().expect("k is 4-D");
    let groups = heads / kv_heads;
    let expand = |t: &Tensor| {
        t.unsqueeze(3)
            .expand([b, lk, kv_heads, groups, d], false)
            .reshape([b, lk, kv_heads * groups, d])
    };
    let k = expand(k);
    let v = expand(v);
    let q = q.to_kind(Kind::Float).transpose(1, 2);
    let k = k.to_kind(Kind::Float).transpose(1, 2);
    let logits = autocast_matmul(&q, &k.transpose(2, 3)) * (d as f64).powf(-0.5);
    let neg = Tensor::from(f32::MIN).to_device(logits.device());
    let masked = logits.where_self(&mask.unsqueeze(1), &neg);
    let probs = masked.softmax(-1, Kind::Float).to_kind(v.kind());
    let out = autocast_matmul(&probs, &v.permute([0, 2, 1, 3]));
    let lq = out.size()[2];
    out.permute([0, 2, 1, 3]).reshape([b, lq, heads * d])
}

/// LeRobot's `make_att_2d_masks`: with c = cumsum(att), token i may attend to j iff
/// c[j] <= c[i] and both are real (not padding).
pub fn make_att_2d_masks(pad: &Tensor, att: &Tensor) -> Tensor {
    let c = att.to_kind(Kind::Int64).cumsum(1, Kind::Int64);
    let allowed = c.unsqueeze(1).le_tensor(&c.unsqueeze(2));
    let pad2d = pad.unsqueeze(1).logical_and(&pad.unsqueeze(2));
    allowed.logical_and(&pad2d)
}

/// Zero-pads the last dimension to `dim` (LeRobot's `pad_vector`).
pub fn pad_vector(x: &Tensor, dim: i64) -> Tensor {
    let cur = *x.size().last().expect("non-scalar");
    if cur >= dim {
        return x.shallow_clone();
    }
    x.constant_pad_nd([0, dim - cur])
}

/// Sinusoidal embedding of the flow-matching time (LeRobot's `create_sinusoidal_pos_embedding`):
/// computed in float64, `[sin | cos]`, returned as float32. `time` [B] → [B, dim].
pub fn sinusoidal_time_embedding(
    time: &Tensor,
    dim: i64,
    min_period: f64,
    max_period: f64,
) -> Tensor {
    let dev = time.device();
    let fraction = Tensor::linspace(0.0, 1.0, dim / 2, (Kind::Double, dev));
    let period = Tensor::pow_scalar(max_period / min_period, &fraction) * min_period;
    let scaling = period.reciprocal() * 2.0 * std::f64::consts::PI;
    let angle = scaling.unsqueeze(0) * time.unsqueeze(1);
    Tensor::cat(&[angle.sin(), angle.cos()], 1).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn att_masks_are_block_causal() {
        let pad = Tensor::from_slice(&[true, true, true, false]).view([1, 4]);
        let att = Tensor::from_slice(&[0i64, 0, 1, 1]).view([1, 4]);
        let m = make_att_2d_masks(&pad, &att);
        let v: Vec<i64> = m.to_kind(Kind::Int64).view([-1]).try_into().unwrap();
        assert_eq!(v, vec![1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn rope_at_position_zero_is_identity() {
        let x = Tensor::randn([1, 2, 3, 8], (Kind::Float, tch::Device::Cpu));
        let p = Tensor::zeros([1, 2], (Kind::Int64, tch::Device::Cpu));
        let y = apply_rope(&x, &p);
        assert!(y.allclose(&x, 0.0, 0.0, false));
    }

    #[test]
    fn rope_tables_give_the_same_rotation() {
        let x = Tensor::randn([2, 5, 3, 8], (Kind::Float, tch::Device::Cpu));
        let p = Tensor::arange(10, (Kind::Int64, tch::Device::Cpu)).view([2, 5]) * 7;
        let t = RopeTables::new(&p, 8);
        let y = apply_rope_with(&x, &t);
        assert!(y.equal(&apply_rope(&x, &p)));
        // A real rotation: norms kept, values changed.
        assert!(!y.allclose(&x, 1e-3, 1e-3, false));
        let n = |t: &Tensor| t.square().sum(Kind::Float).double_value(&[]);
        assert!((n(&y) - n(&x)).abs() < 1e-3 * n(&x));
    }

    #[test]
    fn autocast_runs_linear_in_bf16_and_restores() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let lin = Linear::new(&vs.root(), 64, 32, true);
        let x = Tensor::randn([4, 64], (Kind::Float, tch::Device::Cpu));
        let full = lin.forward(&x);
        let half = autocast(Some(Kind::BFloat16), || {
            assert_eq!(autocast_kind(), Some(Kind::BFloat16));
            lin.forward(&x)
        });
        assert_eq!(autocast_kind(), None);
        assert_eq!(half.kind(), Kind::Float);
        let err = (&half - &full).abs().max().double_value(&[]);
        // bf16 keeps 8 mantissa bits: relative error ~2^-8 per product, summed over 64 terms.
        assert!(err > 0.0 && err < 0.05, "bf16 error {err}");
    }
}
