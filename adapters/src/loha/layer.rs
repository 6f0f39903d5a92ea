//! The LoHa weights: ΔW = scaling · (W1a W1b) ⊙ (W2a W2b), as PEFT's
//! `LoHaLayer`; the layer itself is the shared [`LycorisLayer`].

use tch::Tensor;

use crate::lycoris::{kaiming, Dropout, LycorisLayer, LycorisWeights};

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
    /// Training only: rank dropout (always rescaled) and module dropout.
    pub dropout: Dropout,
}

/// The LoHa adapters attached to one linear layer.
pub type LohaLayer = LycorisLayer<LohaWeights>;

/// The file names of the four factors, in [`LohaWeights::named`]'s order.
pub const FACTORS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

impl LohaWeights {
    /// Fresh factors for a layer `[out, in]` of rank `r`, drawn from
    /// libtorch's CPU generator in PEFT's order: W1a, W1b, W2a
    /// kaiming-uniform, and W2b zero (so ΔW = 0), or kaiming-uniform too
    /// with `init_weights` false.
    pub fn fresh(out_f: i64, in_f: i64, r: i64, init_weights: bool) -> [Tensor; 4] {
        let w1a = kaiming(out_f, r);
        let w1b = kaiming(r, in_f);
        let w2a = kaiming(out_f, r);
        let w2b = if init_weights {
            Tensor::zeros([r, in_f], (tch::Kind::Float, tch::Device::Cpu))
        } else {
            kaiming(r, in_f)
        };
        [w1a, w1b, w2a, w2b]
    }
}

impl LycorisWeights for LohaWeights {
    const METHOD: &'static str = "LoHa";

    /// PEFT's `get_delta_weight` without rank dropout.
    fn delta(&self) -> Tensor {
        self.w1a.matmul(&self.w1b) * self.w2a.matmul(&self.w2b) * self.scaling
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        [&self.w1a, &self.w1b, &self.w2a, &self.w2b]
            .iter()
            .zip(FACTORS)
            .map(|(t, n)| (n.to_owned(), t.shallow_clone()))
            .collect()
    }

    fn dropout(&self) -> Dropout {
        self.dropout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BaseLinear, LayerInput, LinearAdapter};
    use tch::{Device, Kind};

    fn layer(rank: f64, module: f64) -> LohaLayer {
        let [w1a, w1b, w2a, w2b] = LohaWeights::fresh(16, 8, 2, false);
        let dropout = Dropout {
            rank,
            module,
            rescale_rank: true,
        };
        LohaLayer::new(
            "a",
            LohaWeights {
                w1a,
                w1b,
                w2a,
                w2b,
                scaling: 2.0,
                dropout,
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
