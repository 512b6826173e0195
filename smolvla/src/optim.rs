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
        }
    }

    pub fn steps_taken(&self) -> i64 {
        self.step
    }

    /// One step at learning rate `lr` on the current `.grad()`s (parameters without a gradient
    /// are skipped, as torch does).
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let c = self.cfg;
        let step = self.step as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(step);
        let bias_correction2 = 1.0 - c.beta2.powf(step);
        let step_size = lr / bias_correction1;
        let bc2_sqrt = bias_correction2.sqrt();
        tch::no_grad(|| {
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
                let mut p = p.shallow_clone();
                p *= 1.0 - lr * c.weight_decay;
                let _ = m.lerp_(&g, 1.0 - c.beta1);
                *v *= c.beta2;
                let _ = v.addcmul_scalar(&g, &g, 1.0 - c.beta2);
                let denom = (v.sqrt() / bc2_sqrt) + c.eps;
                // addcdiv_(m, denom, value=-step_size) evaluates (value·m)/denom.
                p += (&*m * (-step_size)) / denom;
            }
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
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (Tensor::from(max_norm).to_kind(total.kind()) / (&total + 1e-6)).clamp_max(1.0);
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
