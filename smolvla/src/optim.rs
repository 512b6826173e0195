//! The optimisation of LeRobot's SmolVLA preset: `torch.optim.AdamW` (single-tensor CPU
//! path, reimplemented op for op), `clip_grad_norm_`, and `CosineDecayWithWarmupSchedulerConfig`.

use tch::{Kind, Tensor};

/// AdamW hyper-parameters (the preset: lr 1e-4, betas 0.9/0.95, eps 1e-8, wd 1e-10).
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn from_policy(cfg: &crate::SmolVlaConfig) -> Self {
        Self {
            lr: cfg.optimizer_lr,
            beta1: cfg.optimizer_betas.0,
            beta2: cfg.optimizer_betas.1,
            eps: cfg.optimizer_eps,
            weight_decay: cfg.optimizer_weight_decay,
        }
    }
}

/// `torch.optim.AdamW` over a fixed list of parameters, with its state (exp_avg, exp_avg_sq).
#[derive(Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: i64,
    /// One pass per CPU float32 tensor ([`fused_adamw`]); off only to test it against the
    /// op-by-op path.
    fuse: bool,
}

impl AdamW {
    pub fn new(params: Vec<Tensor>, cfg: AdamWConfig) -> Self {
        let exp_avg = params.iter().map(|p| p.zeros_like()).collect();
        let exp_avg_sq = params.iter().map(|p| p.zeros_like()).collect();
        Self {
            cfg,
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
            fuse: true,
        }
    }

    pub fn steps_taken(&self) -> i64 {
        self.step
    }

    /// One step at learning rate `lr` on the current `.grad()`s (parameters without a gradient
    /// are skipped, as torch does).
    pub fn step(&mut self, lr: f64) {
        self.step_scaled(lr, 1.0);
    }

    /// `clip_grad_norm_(max_norm)` then [`Self::step`], with the clip's scaling folded into
    /// the step (the clipped gradient is used, not written back). Returns the total gradient
    /// norm before clipping, as [`clip_grad_norm`] does.
    pub fn clip_and_step(&mut self, lr: f64, max_norm: f64) -> f64 {
        let (total, coef) = tch::no_grad(|| {
            let grads: Vec<Tensor> = self
                .params
                .iter()
                .map(Tensor::grad)
                .filter(Tensor::defined)
                .collect();
            if grads.is_empty() {
                return (0.0, 1.0);
            }
            let (total, coef) = clip_coef(&grads, max_norm);
            (total.double_value(&[]), coef.double_value(&[]) as f32)
        });
        self.step_scaled(lr, coef);
        total
    }

    /// The step on gradients multiplied by `grad_scale` (f32, as torch's in-place clip would
    /// have rounded them).
    fn step_scaled(&mut self, lr: f64, grad_scale: f32) {
        self.step += 1;
        let c = self.cfg;
        let step = self.step as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(step);
        let bias_correction2 = 1.0 - c.beta2.powf(step);
        let k = FusedConsts {
            decay: (1.0 - lr * c.weight_decay) as f32,
            w1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            w2: (1.0 - c.beta2) as f32,
            bc2_sqrt: bias_correction2.sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
            grad_scale,
        };
        tch::no_grad(|| {
            let mut fused = Vec::new();
            for ((p, m), v) in self
                .params
                .iter()
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                if self.fuse && [p, &g, &*m, &*v].iter().all(|t| fusable(t)) {
                    fused.push([p.shallow_clone(), g, m.shallow_clone(), v.shallow_clone()]);
                    continue;
                }
                let g = if grad_scale == 1.0 {
                    g
                } else {
                    g * f64::from(grad_scale)
                };
                let mut p = p.shallow_clone();
                p *= 1.0 - lr * c.weight_decay;
                let _ = m.lerp_(&g, 1.0 - c.beta1);
                *v *= c.beta2;
                let _ = v.addcmul_scalar(&g, &g, 1.0 - c.beta2);
                let denom = (v.sqrt() / bias_correction2.sqrt()) + c.eps;
                // addcdiv_(m, denom, value=-step_size) evaluates (value·m)/denom.
                p += (&*m * (-(lr / bias_correction1))) / denom;
            }
            fused_adamw(&fused, &k);
        });
    }

    /// Resets every gradient to None (`zero_grad(set_to_none=True)`).
    pub fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }
}

/// `addcmul_` with a value: `self += value · t1 · t2`.
trait AddcmulScalar {
    fn addcmul_scalar(&mut self, t1: &Tensor, t2: &Tensor, value: f64) -> Tensor;
}

impl AddcmulScalar for Tensor {
    fn addcmul_scalar(&mut self, t1: &Tensor, t2: &Tensor, value: f64) -> Tensor {
        // torch computes value·t1·t2 in this order.
        let prod = t1 * value * t2;
        self.g_add_(&prod)
    }
}

/// The scalars of one fused AdamW step, each rounded to f32 as torch's CPU kernels round
/// their Python-float arguments.
#[derive(Debug, Clone, Copy)]
struct FusedConsts {
    decay: f32,
    w1: f32,
    beta2: f32,
    w2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
    grad_scale: f32,
}

/// A contiguous float32 CPU tensor: one the fused step can work on in place.
fn fusable(t: &Tensor) -> bool {
    t.device() == tch::Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
}

/// Elements per work item of the fused step (large enough to amortise the hand-off, small
/// enough to balance ~300 tensors of very different sizes over the threads).
const FUSED_CHUNK: usize = 1 << 16;

/// AdamW on each `[param, grad, exp_avg, exp_avg_sq]` in one pass over memory, on libtorch's
/// intra-op thread count. torch's single-tensor CPU AdamW runs a dozen elementwise kernels,
/// each reading and writing whole tensors and allocating temporaries (~116 bytes of traffic
/// per parameter, 100 M parameters at full size); this reads 16 and writes 12. The arithmetic
/// is torch's, op for op, in f32: `p·decay`, `lerp(m, g, w1)` (one rounding, as its fmadd),
/// `v·β2 + (g·w2)·g`, `(√v / √bc2 + ε)`, `p + (m·(−step))/denom`.
// The one unsafe block of the crate: libtorch hands out raw data pointers only.
#[allow(unsafe_code)]
fn fused_adamw(groups: &[[Tensor; 4]], k: &FusedConsts) {
    // Work items: (group, start, end) element ranges.
    let mut items = Vec::new();
    for (i, [p, ..]) in groups.iter().enumerate() {
        let n = p.numel();
        let mut s = 0;
        while s < n {
            items.push((i, s, (s + FUSED_CHUNK).min(n)));
            s += FUSED_CHUNK;
        }
    }
    // Raw pointers of each group; the tensors outlive the scope below and are distinct
    // allocations (a parameter, its gradient and its two moments), so the slices built from
    // them never alias.
    let ptrs: Vec<[usize; 4]> = groups
        .iter()
        .map(|g| [0, 1, 2, 3].map(|j| g[j].data_ptr() as usize))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || loop {
        let idx = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(&(g, s, e)) = items.get(idx) else {
            break;
        };
        let [p, gr, m, v] = ptrs[g];
        let len = e - s;
        // SAFETY: see above; [s, e) is within each tensor's numel, and no two work items
        // share a range.
        let (p, gr, m, v) = unsafe {
            (
                std::slice::from_raw_parts_mut((p as *mut f32).add(s), len),
                std::slice::from_raw_parts((gr as *const f32).add(s), len),
                std::slice::from_raw_parts_mut((m as *mut f32).add(s), len),
                std::slice::from_raw_parts_mut((v as *mut f32).add(s), len),
            )
        };
        adamw_kernel(p, gr, m, v, k);
    };
    let threads = (tch::get_num_threads().max(1) as usize).min(items.len().max(1));
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(work);
        }
        work();
    });
}

/// The per-element AdamW update of [`fused_adamw`].
fn adamw_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &FusedConsts) {
    for i in 0..p.len() {
        let gi = if k.grad_scale == 1.0 {
            g[i]
        } else {
            g[i] * k.grad_scale
        };
        let pi = p[i] * k.decay;
        // torch's lerp: fmadd(w, end − start, start) for |w| < 0.5, else
        // fmadd(w − 1, end − start, end), rounded once; the product of two f32 is exact in
        // f64, so only the sum rounds (to f64, then f32).
        let mi = if k.w1 < 0.5 {
            (f64::from(k.w1) * f64::from(gi - m[i]) + f64::from(m[i])) as f32
        } else {
            (f64::from(gi) - f64::from(gi - m[i]) * f64::from(1.0 - k.w1)) as f32
        };
        let vi = v[i] * k.beta2 + (gi * k.w2) * gi;
        let denom = vi.sqrt() / k.bc2_sqrt + k.eps;
        p[i] = pi + (mi * k.neg_step_size) / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

/// Total norm and clip coefficient min(1, max_norm / (total + 1e-6)) of `grads`, as
/// `clip_grad_norm_` computes them (0-dim tensors).
fn clip_coef(grads: &[Tensor], max_norm: f64) -> (Tensor, Tensor) {
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
    let total = Tensor::stack(&norms, 0).norm();
    let coef = (Tensor::from(max_norm).to_kind(total.kind()) / (&total + 1e-6)).clamp_max(1.0);
    (total, coef)
}

/// `torch.nn.utils.clip_grad_norm_`: total L2 norm of the per-tensor norms; gradients are
/// scaled by min(1, max_norm / (total + 1e-6)). Returns the total norm (before clipping).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Tensor {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return Tensor::from(0f32);
        }
        let (total, coef) = clip_coef(&grads, max_norm);
        for g in &grads {
            let mut g = g.shallow_clone();
            let _ = g.g_mul_(&coef);
        }
        total
    })
}

/// LeRobot's `CosineDecayWithWarmupSchedulerConfig` (the SmolVLA preset).
#[derive(Debug, Clone, Copy)]
pub struct CosineWithWarmup {
    pub peak_lr: f64,
    pub decay_lr: f64,
    pub num_warmup_steps: i64,
    pub num_decay_steps: i64,
}

impl CosineWithWarmup {
    pub fn from_policy(cfg: &crate::SmolVlaConfig) -> Self {
        Self {
            peak_lr: cfg.optimizer_lr,
            decay_lr: cfg.scheduler_decay_lr,
            num_warmup_steps: cfg.scheduler_warmup_steps,
            num_decay_steps: cfg.scheduler_decay_steps,
        }
    }

    /// The LR multiplier at `step` for a run of `num_training_steps` (warmup and decay are
    /// rescaled when the run is shorter than the decay steps, as LeRobot does).
    pub fn lr_lambda(&self, step: i64, num_training_steps: i64) -> f64 {
        let (mut warmup, mut decay) = (self.num_warmup_steps, self.num_decay_steps);
        if num_training_steps < self.num_decay_steps {
            let scale = num_training_steps as f64 / self.num_decay_steps as f64;
            warmup = (self.num_warmup_steps as f64 * scale) as i64;
            decay = num_training_steps;
        }
        if step < warmup {
            if step <= 0 {
                return 1.0 / (warmup + 1) as f64;
            }
            let frac = 1.0 - step as f64 / warmup as f64;
            return (1.0 / (warmup + 1) as f64 - 1.0) * frac + 1.0;
        }
        let s = step.min(decay) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * s / decay as f64).cos());
        let alpha = self.decay_lr / self.peak_lr;
        (1.0 - alpha) * cosine + alpha
    }

    pub fn lr(&self, step: i64, num_training_steps: i64) -> f64 {
        self.peak_lr * self.lr_lambda(step, num_training_steps)
    }
}

/// Squared L2 distance summed over pairs of tensors (for FedProx and update norms).
pub fn sq_distance(a: &[Tensor], b: &[Tensor]) -> Tensor {
    let parts: Vec<Tensor> = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).square().sum(Kind::Float))
        .collect();
    if parts.is_empty() {
        return Tensor::from(0f32);
    }
    Tensor::stack(&parts, 0).sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten steps of the fused and the op-by-op AdamW from the same start, with and without a
    /// clip, on tensors of sizes around the work-item size: the same parameters and moments
    /// to float32 rounding.
    #[test]
    fn fused_step_matches_the_op_by_op_step() {
        tch::manual_seed(3);
        let cfg = AdamWConfig {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 1e-2,
        };
        let shapes: [&[i64]; 4] = [&[7], &[300, 257], &[1 << 16], &[3, 5, 11]];
        let start: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, (Kind::Float, tch::Device::Cpu)))
            .collect();
        let make = |fuse: bool| {
            let params: Vec<Tensor> = start
                .iter()
                .map(|t| t.copy().set_requires_grad(true))
                .collect();
            let mut o = AdamW::new(params.iter().map(Tensor::shallow_clone).collect(), cfg);
            o.fuse = fuse;
            (params, o)
        };
        let (pa, mut fused) = make(true);
        let (pb, mut plain) = make(false);
        for step in 0..10 {
            let mut norms = [0.0; 2];
            for (j, (params, opt)) in [(&pa, &mut fused), (&pb, &mut plain)]
                .into_iter()
                .enumerate()
            {
                opt.zero_grad();
                let loss: Tensor = params
                    .iter()
                    .map(|p| (p * p * 3.0 + p.sin()).sum(Kind::Float))
                    .fold(Tensor::from(0f32), |a, b| a + b);
                loss.backward();
                // Clip on odd steps (the gradients' norm is far above 1).
                norms[j] = if step % 2 == 1 {
                    if j == 0 {
                        opt.clip_and_step(cfg.lr, 1.0)
                    } else {
                        let n = clip_grad_norm(params, 1.0).double_value(&[]);
                        opt.step(cfg.lr);
                        n
                    }
                } else {
                    opt.step(cfg.lr);
                    0.0
                };
            }
            assert!(
                (norms[0] - norms[1]).abs() <= 1e-6 * norms[1].abs(),
                "{norms:?}"
            );
        }
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = (a - b).abs().max().double_value(&[]);
            let m = b.abs().max().double_value(&[]);
            assert!(d <= 1e-6 * m.max(1e-3), "{what}: max diff {d} (scale {m})");
        };
        for i in 0..shapes.len() {
            close(&pa[i], &pb[i], "param");
            close(&fused.exp_avg[i], &plain.exp_avg[i], "exp_avg");
            close(&fused.exp_avg_sq[i], &plain.exp_avg_sq[i], "exp_avg_sq");
        }
        // The parameters moved (the test is not vacuous).
        assert!((&pa[1] - &start[1]).abs().max().double_value(&[]) > 1e-2);
    }

    #[test]
    fn schedule_endpoints() {
        let s = CosineWithWarmup {
            peak_lr: 1e-4,
            decay_lr: 2.5e-6,
            num_warmup_steps: 1000,
            num_decay_steps: 30000,
        };
        assert!((s.lr(0, 30000) - 1e-4 / 1001.0).abs() < 1e-15);
        // LeRobot's cosine runs from step 0 (not from the end of warmup).
        let c = 0.5 * (1.0 + (std::f64::consts::PI / 30.0).cos());
        let alpha = 2.5e-6 / 1e-4;
        assert!((s.lr(1000, 30000) - 1e-4 * ((1.0 - alpha) * c + alpha)).abs() < 1e-15);
        assert!(s.lr(500, 30000) < s.lr(999, 30000));
        // Short runs rescale warmup and decay.
        assert!(
            (s.lr(10, 100)
                - 1e-4
                    * ((1.0 - alpha) * 0.5 * (1.0 + (std::f64::consts::PI / 10.0).cos()) + alpha))
                .abs()
                < 1e-15
        );
        assert!((s.lr(40000, 30000) - 2.5e-6).abs() < 1e-15);
    }
}
