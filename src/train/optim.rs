//! AdamW with state we can save (tch's optimizer exposes none), the
//! learning-rate schedules of transformers' `get_scheduler`, and gradient-norm
//! clipping as `torch.nn.utils.clip_grad_norm_` does it.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::config::Schedule;

/// AdamW over named parameters (PyTorch's `torch.optim.AdamW` update).
pub struct AdamW {
    /// β1, β2.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Steps taken.
    pub step: u64,
    /// First moments by parameter name.
    pub exp_avg: BTreeMap<String, Tensor>,
    /// Second moments by parameter name.
    pub exp_avg_sq: BTreeMap<String, Tensor>,
    /// Per-parameter multipliers of the learning rate (absent: 1), as
    /// parameter groups with their own `lr` give them in PyTorch.
    pub lr_scale: BTreeMap<String, f64>,
    /// Update with ATen's fused kernel where it applies (default); false:
    /// ATen operations per tensor, `torch.optim.AdamW`'s for-loop.
    pub fused: bool,
}

/// Whether this build has ATen's fused AdamW kernel (libtorch's headers were found).
pub const FUSED_ADAMW_AVAILABLE: bool = cfg!(peft_rs_optim_ops);

/// Sets every parameter's `.grad` to undefined, as PyTorch's
/// `zero_grad()` (`set_to_none=True`) and Trainer do: the next backward
/// pass hands its gradient over instead of adding it to zeros. Where this
/// build lacks the operation, the gradients are zeroed.
pub fn clear_grads<'a>(params: impl IntoIterator<Item = &'a Tensor>) {
    #[cfg(peft_rs_optim_ops)]
    {
        unsafe extern "C" {
            fn peft_clear_grads(ts: *mut *mut std::ffi::c_void, n: i64);
        }
        let mut ts: Vec<*mut std::ffi::c_void> = params
            .into_iter()
            .map(|t| t.as_ptr() as *mut std::ffi::c_void)
            .collect();
        // SAFETY: `ts.len()` live at::Tensor pointers, borrowed for the call.
        unsafe { peft_clear_grads(ts.as_mut_ptr(), ts.len() as i64) };
    }
    #[cfg(not(peft_rs_optim_ops))]
    for p in params {
        p.shallow_clone().zero_grad();
    }
}

/// ATen's fused AdamW kernel (`src/train/optim_ops.cpp`).
mod fused_adamw {
    use tch::{Kind, Tensor};

    #[cfg(peft_rs_optim_ops)]
    unsafe extern "C" {
        fn peft_fused_adamw(
            params: *mut *mut std::ffi::c_void,
            grads: *mut *mut std::ffi::c_void,
            exp_avgs: *mut *mut std::ffi::c_void,
            exp_avg_sqs: *mut *mut std::ffi::c_void,
            n: i64,
            step: f64,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            err: *mut *mut std::ffi::c_char,
        ) -> std::ffi::c_int;
    }

    pub use super::FUSED_ADAMW_AVAILABLE as AVAILABLE;

    /// Whether the kernel takes a parameter, its gradient and moments: one
    /// floating dtype, one device, dense and contiguous.
    pub fn applies(t: &[Tensor; 4]) -> bool {
        let [p, ..] = t;
        AVAILABLE
            && matches!(
                p.kind(),
                Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
            )
            && t.iter().all(|x| {
                x.kind() == p.kind()
                    && x.device() == p.device()
                    && x.size() == p.size()
                    && x.is_contiguous()
            })
    }

    /// One step (the `step`-th) over `group`, [parameter, gradient,
    /// exp_avg, exp_avg_sq] each, all on one device.
    pub fn step(group: &[[Tensor; 4]], step: u64, lr: f64, o: &super::AdamW) -> Result<(), String> {
        #[cfg(peft_rs_optim_ops)]
        {
            let list = |i: usize| -> Vec<*mut std::ffi::c_void> {
                group
                    .iter()
                    .map(|t| t[i].as_ptr() as *mut std::ffi::c_void)
                    .collect()
            };
            let (mut p, mut g, mut m, mut v) = (list(0), list(1), list(2), list(3));
            let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
            // SAFETY: four arrays of `len` live at::Tensor pointers, borrowed
            // for the call; `err` is set (malloc'ed) only on failure.
            let rc = unsafe {
                peft_fused_adamw(
                    p.as_mut_ptr(),
                    g.as_mut_ptr(),
                    m.as_mut_ptr(),
                    v.as_mut_ptr(),
                    group.len() as i64,
                    step as f64,
                    lr,
                    o.betas.0,
                    o.betas.1,
                    o.weight_decay,
                    o.eps,
                    &mut err,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            // SAFETY: on failure the C++ side strdup'ed its message there.
            Err(unsafe { peft_adapters::ffi::take_message(err) })
        }
        #[cfg(not(peft_rs_optim_ops))]
        {
            let _ = (group, step, lr, o);
            Err("not in this build".into())
        }
    }
}

/// LoRA+'s learning-rate multipliers, grouped as PEFT's
/// `create_loraplus_optimizer` groups parameters: `lora_B` and every 1-D
/// adapter tensor (DoRA's magnitude) learn at `ratio` times the rate,
/// `lora_A` at the rate. (Its embedding group, `loraplus_lr_embedding`,
/// would hold adapters on embeddings, which peft-rs does not train.)
pub fn loraplus_lr_scales(params: &BTreeMap<String, Tensor>, ratio: f64) -> BTreeMap<String, f64> {
    params
        .iter()
        .filter(|(k, t)| k.contains("lora_B") || t.dim() == 1)
        .map(|(k, _)| (k.clone(), ratio))
        .collect()
}

impl AdamW {
    /// Zero moments for every parameter.
    pub fn new(
        params: &BTreeMap<String, Tensor>,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
    ) -> Self {
        let zeros = |t: &Tensor| t.zeros_like().detach();
        Self {
            betas,
            eps,
            weight_decay,
            step: 0,
            exp_avg: params.iter().map(|(k, t)| (k.clone(), zeros(t))).collect(),
            exp_avg_sq: params.iter().map(|(k, t)| (k.clone(), zeros(t))).collect(),
            lr_scale: BTreeMap::new(),
            fused: true,
        }
    }

    /// Bytes of the moments this optimizer holds.
    pub fn state_bytes(&self) -> usize {
        self.exp_avg
            .values()
            .chain(self.exp_avg_sq.values())
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// One update with learning rate `lr` from the parameters' `.grad`:
    /// ATen's fused AdamW kernel where this build has it (what
    /// `torch.optim.AdamW(fused=True)` runs, transformers' default), one
    /// call per learning rate and device; ATen operations per tensor for
    /// the rest.
    pub fn step(&mut self, params: &BTreeMap<String, Tensor>, lr: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let mut fused: BTreeMap<(u64, String), Vec<[Tensor; 4]>> = BTreeMap::new();
        let mut unfused = Vec::new();
        for (k, p) in params {
            let g = p.grad();
            // A tensor whose moments another rank keeps is updated there.
            let (Some(m), Some(v), true) =
                (self.exp_avg.get(k), self.exp_avg_sq.get(k), g.defined())
            else {
                continue;
            };
            let lr = lr * self.lr_scale.get(k).copied().unwrap_or(1.0);
            let tensors = [p.shallow_clone(), g, m.shallow_clone(), v.shallow_clone()];
            if self.fused && fused_adamw::applies(&tensors) {
                let key = (lr.to_bits(), format!("{:?}", p.device()));
                fused.entry(key).or_default().push(tensors);
            } else {
                unfused.push((lr, tensors));
            }
        }
        for ((lr, _), group) in fused {
            let lr = f64::from_bits(lr);
            if let Err(e) = fused_adamw::step(&group, self.step, lr, self) {
                // What it takes is checked before the call, and ATen checks
                // before it writes: the tensors are as they were.
                eprintln!("warning: AdamW's fused update refused these tensors ({e}); updating them one by one");
                unfused.extend(group.into_iter().map(|t| (lr, t)));
            }
        }
        for (lr, tensors) in unfused {
            self.step_one(tensors, lr);
        }
    }

    /// The update of one tensor as ATen operations (`torch.optim.AdamW`'s
    /// for-loop implementation).
    fn step_one(&self, [mut p, g, mut m, mut v]: [Tensor; 4], lr: f64) {
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        if self.weight_decay != 0.0 {
            let _ = p.f_mul_scalar_(1.0 - lr * self.weight_decay);
        }
        let _ = m.lerp_(&g, 1.0 - b1);
        let _ = v.f_mul_scalar_(b2);
        let _ = v.f_add_(&(&g * &g * (1.0 - b2)));
        let denom = v.sqrt() / bc2_sqrt + self.eps;
        let _ = p.f_sub_(&(&m / denom * (lr / bc1)));
    }

    /// The state as tensors (moments, and the step count) for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = Vec::new();
        for (k, t) in &self.exp_avg {
            v.push((format!("exp_avg.{k}"), t.shallow_clone()));
        }
        for (k, t) in &self.exp_avg_sq {
            v.push((format!("exp_avg_sq.{k}"), t.shallow_clone()));
        }
        v.push(("step".into(), Tensor::from_slice(&[self.step as i64])));
        v
    }

    /// Restores the state written by [`AdamW::state`] (checked with
    /// [`check_state`] first) for the tensors this optimizer updates.
    pub fn load_state(&mut self, state: BTreeMap<String, Tensor>) -> Result<()> {
        let _g = tch::no_grad_guard();
        for (prefix, map) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
            for (k, t) in map {
                let key = format!("{prefix}.{k}");
                let Some(s) = state.get(&key) else {
                    bail!("optimizer state lacks {key}");
                };
                check_shape(&key, s, &t.size())?;
                t.shallow_clone().copy_(&s.to_kind(Kind::Float));
            }
        }
        self.step = state_step(&state);
        Ok(())
    }
}

/// Checks that `state` (as [`AdamW::state`] writes it) holds both moments
/// of every tensor of `params`, each of its shape.
pub fn check_state(
    state: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
) -> Result<()> {
    for (k, p) in params {
        for prefix in ["exp_avg", "exp_avg_sq"] {
            let key = format!("{prefix}.{k}");
            let Some(s) = state.get(&key) else {
                bail!("optimizer state lacks {key}");
            };
            check_shape(&key, s, &p.size())?;
        }
    }
    Ok(())
}

fn check_shape(key: &str, t: &Tensor, expected: &[i64]) -> Result<()> {
    if t.size() != expected {
        bail!(
            "optimizer state {key} has shape {:?}, expected {expected:?}",
            t.size()
        );
    }
    Ok(())
}

/// The optimizer steps taken, as [`AdamW::state`] records them (0 if absent).
pub fn state_step(state: &BTreeMap<String, Tensor>) -> u64 {
    state.get("step").map_or(0, |s| s.int64_value(&[0]) as u64)
}

/// transformers' schedule multipliers (`get_linear_schedule_with_warmup` and
/// friends), for the 0-based optimizer step `step` of `total`. `warmup` is
/// ignored by [`Schedule::Constant`], as transformers ignores it.
pub fn lr_at(schedule: Schedule, base_lr: f64, step: u64, warmup: u64, total: u64) -> f64 {
    let s = step as f64;
    let warmup = if schedule.has_warmup() { warmup } else { 0 };
    if step < warmup {
        return base_lr * s / (warmup.max(1) as f64);
    }
    let progress = (s - warmup as f64) / ((total.saturating_sub(warmup)).max(1) as f64);
    base_lr
        * match schedule {
            Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
}

/// The global L2 norm of all gradients, as `clip_grad_norm_` computes it
/// (the norm of the per-tensor norms); NaN or inf when any gradient is.
pub fn grad_norm(params: &BTreeMap<String, Tensor>) -> f64 {
    let _g = tch::no_grad_guard();
    let norms: Vec<Tensor> = params
        .values()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .map(|g| g.norm().to_kind(Kind::Float))
        .collect();
    if norms.is_empty() {
        return 0.0;
    }
    Tensor::stack(&norms, 0).norm().double_value(&[])
}

/// Scales gradients down so that their global norm `total` becomes
/// `max_norm` when above it (`clip_grad_norm_`: coefficient
/// max_norm / (total + 1e-6)); `max_norm` 0 is off.
pub fn clip_grads(params: &BTreeMap<String, Tensor>, max_norm: f64, total: f64) {
    if max_norm > 0.0 {
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            scale_grads(params, coef);
        }
    }
}

/// Multiplies every gradient by `factor` in place.
pub fn scale_grads(params: &BTreeMap<String, Tensor>, factor: f64) {
    let _g = tch::no_grad_guard();
    for g in params.values().map(|p| p.grad()).filter(|g| g.defined()) {
        let _ = g.shallow_clone().f_mul_scalar_(factor);
    }
}

/// The global gradient norm, and gradients clipped to `max_norm` (see
/// [`grad_norm`] and [`clip_grads`]).
pub fn clip_grad_norm(params: &BTreeMap<String, Tensor>, max_norm: f64) -> f64 {
    let total = grad_norm(params);
    clip_grads(params, max_norm, total);
    total
}
