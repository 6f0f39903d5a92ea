//! The LoHa layer: `y = W x + b + ΔW x` with
//! ΔW = scaling · (W1a W1b) ⊙ (W2a W2b), module and rank dropout in training,
//! merge and unmerge, as PEFT's `LoHaLayer`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::{BaseLinear, LayerInput, LinearAdapter};

/// One LoHa adapter's weights on one layer, fp32.
pub struct LohaWeights {
    /// `hada_w1_a`, `[out, r]`.
    pub w1a: Tensor,
    /// `hada_w1_b`, `[r, in]`.
    pub w1b: Tensor,
    /// `hada_w2_a`, `[out, r]`.
    pub w2a: Tensor,
    /// `hada_w2_b`, `[r, in]`.
    pub w2b: Tensor,
    /// alpha / r.
    pub scaling: f64,
    /// Training only: the probability of dropping each row of ΔW.
    pub rank_dropout: f64,
    /// Training only: the probability of skipping the adapter.
    pub module_dropout: f64,
}

/// The file names of the four factors, in [`LohaWeights::named`]'s order.
pub const FACTORS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

impl LohaWeights {
    /// ΔW, `[out, in]`, fp32 (PEFT's `get_delta_weight` without rank dropout).
    pub fn delta(&self) -> Tensor {
        self.w1a.matmul(&self.w1b) * self.w2a.matmul(&self.w2b) * self.scaling
    }

    /// The factors under their names in PEFT's files.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        [&self.w1a, &self.w1b, &self.w2a, &self.w2b]
            .iter()
            .zip(FACTORS)
            .map(|(t, n)| (n.to_owned(), t.shallow_clone()))
            .collect()
    }

    /// Fresh factors for a layer `[out, in]` of rank `r`, drawn from
    /// libtorch's CPU generator in PEFT's order: W1a, W1b, W2a
    /// kaiming-uniform(a=√5) = U(-1/√fan_in, 1/√fan_in), and W2b zero (so
    /// ΔW = 0), or kaiming-uniform too with `init_weights` false.
    pub fn fresh(out_f: i64, in_f: i64, r: i64, init_weights: bool) -> [Tensor; 4] {
        let opts = (Kind::Float, Device::Cpu);
        let kaiming = |rows: i64, fan_in: i64| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::empty([rows, fan_in], opts).uniform_(-bound, bound)
        };
        let w1a = kaiming(out_f, r);
        let w1b = kaiming(r, in_f);
        let w2a = kaiming(out_f, r);
        let w2b = if init_weights {
            Tensor::zeros([r, in_f], opts)
        } else {
            kaiming(r, in_f)
        };
        [w1a, w1b, w2a, w2b]
    }
}

/// The LoHa adapters attached to one linear layer.
pub struct LohaLayer {
    adapters: BTreeMap<String, LohaWeights>,
    active: Vec<String>,
    merged: Vec<String>,
    training: bool,
}

impl LohaLayer {
    /// A layer carrying one active adapter.
    pub fn new(name: &str, weights: LohaWeights) -> Self {
        Self {
            adapters: [(name.to_owned(), weights)].into(),
            active: vec![name.to_owned()],
            merged: vec![],
            training: false,
        }
    }

    fn active_unmerged(&self) -> impl Iterator<Item = (&String, &LohaWeights)> {
        self.active
            .iter()
            .filter(|n| !self.merged.contains(n))
            .filter_map(|n| self.adapters.get_key_value(n))
    }
}

/// A uniform draw in [0, 1) from libtorch's CPU generator (PEFT's `torch.rand`).
fn rand(n: i64) -> Tensor {
    Tensor::rand([n], (Kind::Float, Device::Cpu))
}

impl LinearAdapter for LohaLayer {
    fn forward(&self, input: &LayerInput, base_output: Tensor, _base: &BaseLinear) -> Tensor {
        let kind = base_output.kind();
        let mut out: Option<Tensor> = None;
        for (_, w) in self.active_unmerged() {
            // PEFT draws the module-dropout number only in training.
            if self.training && rand(1).double_value(&[0]) <= w.module_dropout {
                continue;
            }
            let delta = w.delta();
            let delta = if self.training && w.rank_dropout > 0.0 {
                // As PEFT: each row kept with probability 1 - p, the kept
                // ones rescaled by the share actually kept.
                let drop = rand(delta.size()[0])
                    .gt(w.rank_dropout)
                    .to_kind(Kind::Float)
                    .to_device(delta.device());
                let drop = &drop / drop.mean(Kind::Float);
                delta * drop.unsqueeze(1)
            } else {
                delta
            };
            let x = input.derived(&format!("{:?}", Kind::Float), |x| x.to_kind(Kind::Float));
            let sum = out.unwrap_or_else(|| base_output.shallow_clone());
            // As PEFT: the base output plus the fp32 activations (promoted), cast at the end.
            out = Some(sum + x.linear::<Tensor>(&delta, None));
        }
        match out {
            Some(y) => y.to_kind(kind),
            None => base_output,
        }
    }

    fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.active
            .iter()
            .filter_map(|n| self.adapters.get(n))
            .flat_map(LohaWeights::named)
            .collect()
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn merge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        let names: Vec<String> = self.active_unmerged().map(|(n, _)| n.clone()).collect();
        for name in names {
            let new = weight.to_kind(Kind::Float) + self.adapters[&name].delta();
            if !bool::try_from(new.isfinite().all())? {
                bail!(
                    "merging LoHa adapter `{name}` gives NaN or inf weights; the adapter is broken"
                );
            }
            *weight = new.to_kind(weight.kind());
            self.merged.push(name);
        }
        Ok(())
    }

    fn unmerge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        while let Some(name) = self.merged.pop() {
            let w = &self.adapters[&name];
            *weight = (weight.to_kind(Kind::Float) - w.delta()).to_kind(weight.kind());
        }
        Ok(())
    }

    fn state_dict(&self, name: &str) -> Vec<(String, Tensor)> {
        self.adapters
            .get(name)
            .map(LohaWeights::named)
            .unwrap_or_default()
    }

    fn set_active(&mut self, names: &[String]) {
        self.active = crate::held_names(names, |n| self.adapters.contains_key(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(rank_dropout: f64, module_dropout: f64) -> LohaLayer {
        let [w1a, w1b, w2a, w2b] = LohaWeights::fresh(16, 8, 2, false);
        LohaLayer::new(
            "a",
            LohaWeights {
                w1a,
                w1b,
                w2a,
                w2b,
                scaling: 2.0,
                rank_dropout,
                module_dropout,
            },
        )
    }

    fn adapter_output(l: &LohaLayer, x: &Tensor) -> Tensor {
        let base = Tensor::zeros([x.size()[0], 16], (Kind::Float, Device::Cpu));
        let w = || Tensor::zeros([16, 8], (Kind::Float, Device::Cpu));
        let b = BaseLinear {
            weight: &w,
            bias: None,
        };
        l.forward(&LayerInput::new(x), base, &b)
    }

    /// Rank dropout zeroes whole output rows of ΔW in training and scales
    /// the others by n / kept (PEFT's `drop /= drop.mean()`); module dropout
    /// skips the adapter; neither acts outside training.
    #[test]
    fn rank_and_module_dropout_act_in_training_only() {
        tch::manual_seed(1);
        let x = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        let mut l = layer(0.5, 0.0);
        let plain = adapter_output(&l, &x);
        l.set_training(true);
        let dropped = adapter_output(&l, &x);
        let ratio = (&dropped / &plain).mean_dim(0, false, Kind::Float);
        let kept: Vec<f64> = Vec::<f64>::try_from(&ratio).unwrap();
        let n_kept = kept.iter().filter(|r| r.abs() > 1e-6).count();
        assert!(n_kept > 0 && n_kept < 16, "{kept:?}");
        let c = 16.0 / n_kept as f64;
        for r in &kept {
            assert!(
                r.abs() < 1e-6 || (r - c).abs() < 1e-4,
                "{r} is neither 0 nor {c}"
            );
        }
        let mut skip = layer(0.0, 1.0);
        skip.set_training(true);
        assert_eq!(adapter_output(&skip, &x).abs().max().double_value(&[]), 0.0);
        skip.set_training(false);
        assert!(adapter_output(&skip, &x).abs().max().double_value(&[]) > 0.0);
    }
}
