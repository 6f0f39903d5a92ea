//! The LoRA layer: `y = W x + b + scaling · B(A(dropout(x)))`, with the DoRA
//! variant, several named adapters per layer, and merge/unmerge.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::config::InitLoraWeights;
use crate::{BaseLinear, LayerInput, LinearAdapter};

/// One adapter's weights on one layer. Always fp32, whatever the base dtype.
pub struct LoraWeights {
    /// `lora_A.weight`, `[r, in_features]`.
    pub a: Tensor,
    /// `lora_B.weight`, `[out_features, r]`.
    pub b: Tensor,
    /// DoRA's `lora_magnitude_vector`, `[out_features]`.
    pub magnitude: Option<Tensor>,
    /// alpha / r, or alpha / √r with rsLoRA.
    pub scaling: f64,
    /// Dropout probability on the adapter input (training only).
    pub dropout: f64,
}

impl LoraWeights {
    /// Fresh weights with PEFT's initialisation, drawn from libtorch's CPU
    /// generator (seed it with `tch::manual_seed` for reproducible runs).
    /// `weight` is the frozen base weight, used for DoRA's magnitude.
    ///
    /// As in PEFT, the draws happen on the CPU and the weights are then moved
    /// to the base layer's device, so one seed gives one initial adapter on
    /// every device; and, as PEFT's move to the base dtype followed by its
    /// upcast of adapters to fp32 does, a 16-bit base rounds them through its
    /// dtype.
    pub fn init(
        weight: &Tensor,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: InitLoraWeights,
        dora: bool,
        device: Device,
    ) -> Self {
        let (out_f, in_f) = (weight.size()[0], weight.size()[1]);
        let r = r as i64;
        let opts = (Kind::Float, Device::Cpu);
        // kaiming_uniform_(a=√5) on a [fan_out, fan_in] weight is U(-1/√fan_in, 1/√fan_in).
        let kaiming = |rows: i64, fan_in: i64| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::empty([rows, fan_in], opts).uniform_(-bound, bound)
        };
        // PEFT builds lora_A and lora_B as nn.Linear, whose constructors
        // draw their weights, and then re-initialises A (and zeroes B) unless
        // `init_lora_weights` is false: the same draws give PEFT's adapter for
        // one seed.
        let (ctor_a, ctor_b) = (kaiming(r, in_f), kaiming(out_f, r));
        let (a, b) = match init {
            InitLoraWeights::Default => (kaiming(r, in_f), Tensor::zeros([out_f, r], opts)),
            InitLoraWeights::Gaussian => (
                Tensor::empty([r, in_f], opts).normal_(0.0, 1.0 / r as f64),
                Tensor::zeros([out_f, r], opts),
            ),
            InitLoraWeights::Random => (ctor_a, ctor_b),
            base_reading => {
                panic!("{base_reading} reads the base weight: use LoraWeights::from_initial")
            }
        };
        let mut w = Self::from_initial(a, b, weight.kind(), scaling, dropout, device);
        if dora {
            let m = tch::no_grad(|| row_norm(&(weight.to_kind(Kind::Float) + w.delta())));
            w.magnitude = Some(m.set_requires_grad(true));
        }
        w
    }

    /// Weights starting at the fp32 `a` and `b` made on the CPU for a base
    /// of dtype `base_kind`, placed on `device` as [`LoraWeights::init`]
    /// places its draws.
    pub fn from_initial(
        a: Tensor,
        b: Tensor,
        base_kind: Kind,
        scaling: f64,
        dropout: f64,
        device: Device,
    ) -> Self {
        Self {
            a: placed_like_peft(a, base_kind, device),
            b: placed_like_peft(b, base_kind, device),
            magnitude: None,
            scaling,
            dropout,
        }
    }

    /// `scaling · B @ A`, `[out, in]`, fp32.
    pub fn delta(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scaling
    }

    /// Rank.
    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }

    /// The tensors in PEFT's naming (without prefix and adapter name).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("lora_A.weight".to_owned(), self.a.shallow_clone()),
            ("lora_B.weight".to_owned(), self.b.shallow_clone()),
        ];
        if let Some(m) = &self.magnitude {
            v.push(("lora_magnitude_vector".to_owned(), m.shallow_clone()));
        }
        v
    }
}

/// A fresh fp32 adapter tensor placed as PEFT places it: moved to the
/// base's dtype when that is 16-bit (PEFT's move to the base layer) and back
/// to fp32 (its upcast of adapters), so it is rounded through that dtype;
/// then on `device`, trainable.
pub fn placed_like_peft(t: Tensor, base_kind: Kind, device: Device) -> Tensor {
    let t = match base_kind {
        k @ (Kind::BFloat16 | Kind::Half) => t.to_kind(k).to_kind(Kind::Float),
        _ => t,
    };
    t.to_device(device).set_requires_grad(true)
}

/// How [`LoraWeights::combine`] combines adapters (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// PEFT's `linear`: one rank for all; A and B are weighted sums, so the
    /// product has cross terms between adapters.
    Linear,
    /// PEFT's `cat`: ranks concatenated, so the delta is exactly Σ wᵢ·sᵢ·BᵢAᵢ.
    Cat,
}

impl LoraWeights {
    /// A new adapter combining `parts` (adapter, weight), as PEFT's
    /// `add_weighted_adapter`; its scaling is 1 and it has no dropout.
    pub fn combine(parts: &[(&LoraWeights, f64)], how: Combination) -> Result<LoraWeights> {
        if parts.iter().any(|(a, _)| a.magnitude.is_some()) {
            bail!("DoRA adapters cannot be combined (PEFT refuses this too)");
        }
        let Some((first, _)) = parts.first() else {
            bail!("nothing to combine");
        };
        let (a, b) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            Ok(match how {
                Combination::Linear => {
                    if parts.iter().any(|(a, _)| a.rank() != first.rank()) {
                        bail!("`linear` combination needs adapters of one rank; use `cat`");
                    }
                    let mut a = first.a.zeros_like();
                    let mut b = first.b.zeros_like();
                    // PEFT splits √|wᵢ·sᵢ| between A (with the sign) and B.
                    for (w, weight) in parts {
                        let ws = weight * w.scaling;
                        a += &w.a * (ws.abs().sqrt() * ws.signum());
                        b += &w.b * ws.abs().sqrt();
                    }
                    (a, b)
                }
                Combination::Cat => {
                    let a: Vec<Tensor> = parts
                        .iter()
                        .map(|(w, weight)| &w.a * (weight * w.scaling))
                        .collect();
                    let b: Vec<Tensor> = parts.iter().map(|(w, _)| w.b.shallow_clone()).collect();
                    (Tensor::cat(&a, 0), Tensor::cat(&b, 1))
                }
            })
        })?;
        Ok(LoraWeights {
            a: a.set_requires_grad(true),
            b: b.set_requires_grad(true),
            magnitude: None,
            scaling: 1.0,
            dropout: 0.0,
        })
    }
}

/// How dropout draws its mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropoutKernel {
    /// libtorch's fused kernel, which scales the kept elements by 1/(1-p).
    Fused,
    /// A mask drawn on the host from one seed taken from libtorch's
    /// generator, applied with `where` (whose backward keeps a one-byte mask
    /// instead of a four-byte noise tensor; `masked_fill`, which keeps the
    /// same, has no vectorised CPU kernel). The kept elements stay unscaled.
    /// A tenth of a CPU training step went to libtorch's single-threaded
    /// Bernoulli sampling before.
    HostMask,
}

impl DropoutKernel {
    /// The kernel for tensors on `device`: the host mask on the CPU, the
    /// fused kernel on a GPU (a pure function, tested with both).
    pub fn for_device(device: Device) -> Self {
        if device == Device::Cpu {
            Self::HostMask
        } else {
            Self::Fused
        }
    }

    /// The factor still due after this kernel: 1/(1-p) after the host mask
    /// (the LoRA layer applies it to the rank-r activations, a fraction of
    /// the input's size), 1 after the fused kernel.
    pub fn remaining_factor(self, p: f64) -> f64 {
        match self {
            Self::HostMask => 1.0 / (1.0 - p),
            Self::Fused => 1.0,
        }
    }
}

/// Dropout in training with `kernel`: each element zeroed with probability
/// `p` (drawn from libtorch's generator: seed it through
/// [`crate::rng::with_torch_seed`]); multiplied by
/// [`DropoutKernel::remaining_factor`] it is inverted dropout.
pub fn dropout_with(x: &Tensor, p: f64, kernel: DropoutKernel) -> Tensor {
    match kernel {
        DropoutKernel::Fused => x.dropout(p, true),
        DropoutKernel::HostMask => {
            let keep = crate::rng::keep_mask(x.numel(), p, draw_seed());
            let keep = Tensor::from_slice(&keep)
                .view(x.size().as_slice())
                .to_device(x.device());
            x.where_scalarother(&keep, 0.0)
        }
    }
}

/// The seed of one dropout mask, from libtorch's generator (seeded per
/// step and layer by the caller, so a recomputed layer draws it again).
fn draw_seed() -> u64 {
    Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64
}

/// [`dropout_with`] the kernel of `x`'s device.
pub fn dropout(x: &Tensor, p: f64) -> Tensor {
    dropout_with(x, p, DropoutKernel::for_device(x.device()))
}

/// The factor [`dropout`] left for the caller to apply on `device`.
pub fn dropout_factor(device: Device, p: f64) -> f64 {
    DropoutKernel::for_device(device).remaining_factor(p)
}

/// Whether `s` is 2^k for some integer k (a normal positive double whose
/// mantissa bits are all zero).
fn is_power_of_two(s: f64) -> bool {
    s.is_normal() && s > 0.0 && s.to_bits() & ((1u64 << 52) - 1) == 0
}

/// The L2 norm of each row (PEFT's `get_weight_norm` over dim 1).
fn row_norm(w: &Tensor) -> Tensor {
    w.norm_scalaropt_dim(2, [1i64].as_slice(), false)
}

/// The adapters attached to one linear layer.
pub struct LoraLayer {
    adapters: BTreeMap<String, LoraWeights>,
    active: Vec<String>,
    training: bool,
    /// Merged adapters in merge order, with DoRA's weight norm kept for unmerge.
    merged: Vec<(String, Option<Tensor>)>,
    /// The dtype of the LoRA matmuls (fp32 unless asked otherwise).
    compute_kind: Kind,
    /// Share one dropout draw with the other layers reading the same input.
    share_dropout: bool,
}

impl LoraLayer {
    /// A layer carrying one adapter, which is active.
    pub fn new(name: &str, weights: LoraWeights) -> Self {
        let mut adapters = BTreeMap::new();
        adapters.insert(name.to_owned(), weights);
        Self {
            adapters,
            active: vec![name.to_owned()],
            training: false,
            merged: vec![],
            compute_kind: Kind::Float,
            share_dropout: true,
        }
    }

    /// Adds another named adapter (inactive until [`LoraLayer::set_active`]).
    pub fn add(&mut self, name: &str, weights: LoraWeights) -> Result<()> {
        if self.adapters.contains_key(name) {
            bail!("an adapter named `{name}` is already loaded");
        }
        self.adapters.insert(name.to_owned(), weights);
        Ok(())
    }

    /// Chooses which adapters are summed in the forward pass.
    pub fn set_active(&mut self, names: &[String]) {
        self.active = crate::held_names(names, |n| self.adapters.contains_key(n));
    }

    /// The adapter named `name`.
    pub fn get(&self, name: &str) -> Option<&LoraWeights> {
        self.adapters.get(name)
    }

    /// Names of the adapters on this layer.
    pub fn names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// Whether any adapter is merged into the base weight.
    pub fn is_merged(&self) -> bool {
        !self.merged.is_empty()
    }

    /// The adapter's input in dtype `ck`, dropped out in training with the
    /// factor [`dropout`] left to apply; one draw per [`LayerInput`] when
    /// sharing is on, so the q/k/v (or gate/up) adapters see the same units dropped.
    fn adapter_input(&self, input: &LayerInput, p: f64, ck: Kind) -> (Tensor, f64) {
        let cast = |x: &Tensor| x.to_kind(ck);
        if !(self.training && p > 0.0) {
            return (input.derived(&format!("{ck:?}"), cast), 1.0);
        }
        let drop = |x: &Tensor| dropout(&cast(x), p);
        let xd = if self.share_dropout {
            input.derived(&format!("{ck:?} dropout {p}"), drop)
        } else {
            drop(input.tensor())
        };
        let factor = dropout_factor(xd.device(), p);
        (xd, factor)
    }

    /// The rank-r product `dropout(x) Aᵀ` in dtype `ck`, and the dropout
    /// factor still due. In training on the CPU one fused operation
    /// ([`super::dropout_a`]) that keeps no mask and no dropped-out copy of
    /// the input, with the mask [`adapter_input`](Self::adapter_input) would
    /// draw (from the same seed, one per shared input when sharing is on).
    fn first_product(&self, input: &LayerInput, w: &LoraWeights, ck: Kind) -> (Tensor, f64) {
        let a = if ck == Kind::Float {
            w.a.shallow_clone()
        } else {
            w.a.to_kind(ck)
        };
        let p = w.dropout;
        let host = DropoutKernel::for_device(input.tensor().device()) == DropoutKernel::HostMask;
        if self.training && p > 0.0 && host && super::dropout_a::AVAILABLE {
            let x = input.derived(&format!("{ck:?}"), |x| x.to_kind(ck));
            let seed = if self.share_dropout {
                let seed = input.derived(&format!("{ck:?} dropout seed {p}"), |_| {
                    Tensor::from(draw_seed() as i64)
                });
                seed.int64_value(&[]) as u64
            } else {
                draw_seed()
            };
            if let Some(h) = super::dropout_a::dropout_a(&x, &a, p, seed) {
                return (h, DropoutKernel::HostMask.remaining_factor(p));
            }
        }
        let (xd, keep_scale) = self.adapter_input(input, p, ck);
        (xd.linear::<Tensor>(&a, None), keep_scale)
    }

    /// PEFT's LoRA under transformers' 16-bit autocast (Trainer's `bf16=True`
    /// or `fp16=True`): the matmuls, the scaling and the sum with the base
    /// output all in the compute dtype. No fp32 copy of the `[tokens, out]`
    /// output is made, in either pass, which is what makes it cheap.
    fn forward_as_autocast(&self, input: &LayerInput, base_output: Tensor) -> Tensor {
        let ck = self.compute_kind;
        self.active_unmerged().fold(base_output, |out, w| {
            let (h, keep_scale) = self.first_product(input, w, ck);
            let b = w.b.to_kind(ck);
            // Multiplying by a power of two commutes with bf16's rounding
            // (its exponent range is fp32's), so the scaling applied to the
            // rank-r activations gives the bits autocast's scaling of the
            // [tokens, out] product gives, in both passes, without a pass
            // over that product each way.
            if ck == Kind::BFloat16 && is_power_of_two(w.scaling) {
                let factor = keep_scale * w.scaling;
                let h = if factor != 1.0 { h * factor } else { h };
                return out + h.linear::<Tensor>(&b, None);
            }
            let h = if keep_scale != 1.0 { h * keep_scale } else { h };
            out + h.linear::<Tensor>(&b, None) * w.scaling
        })
    }

    fn active_unmerged(&self) -> impl Iterator<Item = &LoraWeights> {
        self.active
            .iter()
            .filter(|n| !self.merged.iter().any(|(m, _)| m == *n))
            .filter_map(|n| self.adapters.get(n))
    }
}

impl LinearAdapter for LoraLayer {
    fn ignores_base_output_value(&self) -> bool {
        // DoRA rescales the base output by its magnitude over the weight's norm.
        !self.active_unmerged().any(|w| w.magnitude.is_some())
    }

    fn forward(&self, input: &LayerInput, base_output: Tensor, base: &BaseLinear) -> Tensor {
        let kind = base_output.kind();
        let mut active = self.active_unmerged().peekable();
        if active.peek().is_none() {
            return base_output;
        }
        // DoRA's backward keeps the base output, so its sum is never changed in place.
        let in_place = !self.active_unmerged().any(|w| w.magnitude.is_some());
        if in_place && self.compute_kind != Kind::Float {
            return self.forward_as_autocast(input, base_output);
        }
        // As PEFT: the adapters' outputs are added to the base output in fp32
        // and the sum is cast back once, so a bf16 base rounds only there.
        let mut sum = base_output.to_kind(Kind::Float);
        for w in active {
            // Adapters compute in fp32 (they are stored in fp32), as PEFT casts
            // the input to lora_A's dtype; DoRA's weight norm always does.
            let ck = match w.magnitude {
                None => self.compute_kind,
                Some(_) => Kind::Float,
            };
            let dropout_on = self.training && w.dropout > 0.0;
            // As autocast when `ck` is 16-bit: the fp32 weights are cast for
            // the matmul, and their gradients flow back through the cast in fp32.
            let cast = |t: &Tensor| {
                if ck == Kind::Float {
                    t.shallow_clone()
                } else {
                    t.to_kind(ck)
                }
            };
            // DoRA reads the dropped-out input itself; LoRA only its product.
            let (xd, h, keep_scale) = match w.magnitude {
                None => {
                    let (h, keep_scale) = self.first_product(input, w, ck);
                    (None, h, keep_scale)
                }
                Some(_) => {
                    let (xd, keep_scale) = self.adapter_input(input, w.dropout, ck);
                    let h = xd.linear::<Tensor>(&cast(&w.a), None);
                    (Some(xd), h, keep_scale)
                }
            };
            // Dropout's factor where it is still due (on the CPU).
            let kept = |t: Tensor| if keep_scale != 1.0 { t * keep_scale } else { t };
            let added = match &w.magnitude {
                None if in_place && ck == Kind::Float && sum.dim() == 2 => {
                    // sum += (s·h) Bᵀ as one GEMM accumulating into the sum,
                    // which nothing saved for backward: no [tokens, out]
                    // product, scaled copy and sum. The scaling goes on the
                    // rank-r activations. That equals PEFT's `(h Bᵀ)·s` bit
                    // for bit only when s is a power of two and there is no
                    // dropout factor (rsLoRA's alpha/√r, 1/(1-p) and other
                    // alphas round once more), and only where the GEMM adds
                    // its product to the sum after computing it (MKL here;
                    // cuBLAS adds inside): otherwise it differs by an ulp
                    // of the adapter's output, within every parity tolerance.
                    let hs = h * (w.scaling * keep_scale);
                    let _ = sum.addmm_(&hs, &w.b.tr());
                    continue;
                }
                None => {
                    kept(h)
                        .linear::<Tensor>(&cast(&w.b), None)
                        .to_kind(Kind::Float)
                        * w.scaling
                }
                Some(m) => {
                    let lora = kept(h).linear::<Tensor>(&w.b, None);
                    let w32 = (base.weight)().to_kind(Kind::Float);
                    // The norm is a constant for backprop, as in the DoRA paper (§4.3) and PEFT.
                    let norm = row_norm(&(&w32 + w.delta().detach())).detach();
                    let scale = m / norm;
                    // The base output without bias (in the base dtype, as PEFT
                    // subtracts it); with dropout on, recomputed on the
                    // dropped-out input so both terms see the same x.
                    let base_nb = if dropout_on {
                        let xd = xd.as_ref().expect("DoRA keeps its dropped-out input");
                        kept(xd.matmul(&w32.tr()))
                    } else {
                        match base.bias {
                            Some(b) => (&base_output - b).to_kind(Kind::Float),
                            None => base_output.to_kind(Kind::Float),
                        }
                    };
                    (&scale - 1.0) * base_nb + &scale * lora * w.scaling
                }
            };
            sum = &sum + added;
        }
        sum.to_kind(kind)
    }

    fn set_dropout_sharing(&mut self, shared: bool) {
        self.share_dropout = shared;
    }

    fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.active
            .iter()
            .filter_map(|n| self.adapters.get(n))
            .flat_map(|w| w.named())
            .collect()
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn set_compute_kind(&mut self, kind: Kind) {
        self.compute_kind = kind;
    }

    fn merge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        let active: Vec<String> = self
            .active
            .iter()
            .filter(|n| !self.merged.iter().any(|(m, _)| m == *n))
            .cloned()
            .collect();
        for name in active {
            let w = &self.adapters[&name];
            let w32 = weight.to_kind(Kind::Float);
            let (new, norm) = match &w.magnitude {
                None => (w32 + w.delta(), None),
                Some(m) => {
                    let sum = w32 + w.delta();
                    let norm = row_norm(&sum);
                    ((m / &norm).unsqueeze(1) * sum, Some(norm))
                }
            };
            // PEFT's safe_merge: refuse to write NaN/inf into the base.
            if !bool::try_from(new.isfinite().all())? {
                bail!("merging adapter `{name}` gives NaN or inf weights; the adapter is broken");
            }
            *weight = new.to_kind(weight.kind());
            self.merged.push((name, norm));
        }
        Ok(())
    }

    fn unmerge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        while let Some((name, norm)) = self.merged.pop() {
            let w = &self.adapters[&name];
            let w32 = weight.to_kind(Kind::Float);
            let base = match (&w.magnitude, norm) {
                (Some(m), Some(norm)) => w32 / (m / norm).unsqueeze(1) - w.delta(),
                _ => w32 - w.delta(),
            };
            *weight = base.to_kind(weight.kind());
        }
        Ok(())
    }

    fn state_dict(&self, name: &str) -> Vec<(String, Tensor)> {
        self.get(name).map(LoraWeights::named).unwrap_or_default()
    }

    fn set_active(&mut self, names: &[String]) {
        LoraLayer::set_active(self, names);
    }

    fn add_lora(&mut self, name: &str, weights: LoraWeights) -> Result<()> {
        self.add(name, weights)
    }

    fn add_weighted(
        &mut self,
        names: &[String],
        weights: &[f64],
        new_name: &str,
        combination: Combination,
    ) -> Result<()> {
        let parts: Vec<(&LoraWeights, f64)> = names
            .iter()
            .zip(weights)
            .filter_map(|(n, &w)| self.get(n).map(|a| (a, w)))
            .collect();
        if parts.is_empty() {
            return Ok(());
        }
        let combined = LoraWeights::combine(&parts, combination)?;
        self.add(new_name, combined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powers_of_two_are_told_apart() {
        for s in [1.0, 2.0, 0.25, 8.0, 1024.0, 0.5f64.powi(40)] {
            assert!(is_power_of_two(s), "{s}");
        }
        for s in [
            0.0,
            -2.0,
            3.0,
            0.75,
            32.0 / 3.0,
            f64::INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE / 2.0,
        ] {
            assert!(!is_power_of_two(s), "{s}");
        }
    }

    /// Both kernels, run here on the CPU, give inverted dropout once their
    /// remaining factor is applied: about p of the values zeroed and the
    /// mean of the rest kept.
    #[test]
    fn each_dropout_kernel_with_its_factor_is_inverted_dropout() {
        assert_eq!(
            DropoutKernel::for_device(Device::Cpu),
            DropoutKernel::HostMask
        );
        assert_eq!(
            DropoutKernel::for_device(Device::Cuda(0)),
            DropoutKernel::Fused
        );
        let (n, p) = (200_000i64, 0.1);
        let x = Tensor::ones([n], (Kind::Float, Device::Cpu));
        for kernel in [DropoutKernel::Fused, DropoutKernel::HostMask] {
            let y = crate::rng::with_torch_seed(3, || dropout_with(&x, p, kernel))
                * kernel.remaining_factor(p);
            let zeros = y
                .eq(0.0)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            let mean = y.mean(Kind::Float).double_value(&[]);
            // Binomial standard error of the zeroed share: sqrt(p(1-p)/n) = 6.7e-4.
            assert!((zeros - p).abs() < 5.0 * 6.7e-4, "{kernel:?}: {zeros}");
            // The mean's standard error: sqrt(p/(1-p)/n) = 7.5e-4.
            assert!((mean - 1.0).abs() < 5.0 * 7.5e-4, "{kernel:?}: {mean}");
        }
    }
}
