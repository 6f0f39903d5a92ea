//! Gaussian noise on decoder layers' outputs in training: the hidden-state
//! counterpart of NEFTune's embedding noise (a built-in, to be chosen by
//! name: `--regularizer hidden_noise:layer=3,std=0.01`).

use tch::Tensor;

use crate::{rng, HookContext, HookPoint, Regularizer};

/// `N(0, std²)` added to the output of each of `layers` in training forward
/// passes only; the noise carries no gradient.
#[derive(Debug, Clone)]
pub struct HiddenNoise {
    /// The decoder layers (`model.layers.N`) whose outputs are noised.
    pub layers: Vec<usize>,
    /// The noise's standard deviation.
    pub std: f64,
}

impl Regularizer for HiddenNoise {
    fn name(&self) -> String {
        let layers: Vec<String> = self.layers.iter().map(usize::to_string).collect();
        format!(
            "hidden_noise(layers={}, std={})",
            layers.join("+"),
            self.std
        )
    }

    fn hook_points(&self) -> Vec<HookPoint> {
        self.layers
            .iter()
            .map(|&i| HookPoint::DecoderLayerOutput(i))
            .collect()
    }

    fn apply(&mut self, _point: HookPoint, value: Tensor, ctx: &HookContext) -> Tensor {
        if !ctx.training || self.std == 0.0 {
            return value;
        }
        // From the call's seed: the same draws when gradient checkpointing
        // recomputes the layer, and after a resume.
        let noise = rng::with_torch_seed(ctx.seed, || {
            let _g = tch::no_grad_guard();
            value.to_kind(tch::Kind::Float).randn_like() * self.std
        });
        let kind = value.kind();
        value + noise.to_kind(kind)
    }
}
