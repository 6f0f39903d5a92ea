//! The building blocks the model files share: a frozen linear layer that may
//! carry an adapter, an embedding, an RMS norm, and the hook interface through
//! which activations can be observed or changed at named module paths.

use peft_adapters::{BaseLinear, LinearAdapter};
use tch::Tensor;

/// A frozen `y = x Wᵀ + b` whose output an adapter may change.
///
/// The model code calls [`Linear::forward`] and never knows whether, or which,
/// adapter is attached: adapters wrap the layer the way PEFT's `LoraLayer`
/// wraps `base_layer`.
pub struct Linear {
    /// `[out_features, in_features]`, never requires grad.
    pub weight: Tensor,
    /// `[out_features]`, never requires grad.
    pub bias: Option<Tensor>,
    /// The adapter wrapping this layer, if any.
    pub adapter: Option<Box<dyn LinearAdapter>>,
}

impl Linear {
    /// A layer without adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
        }
    }

    /// `[in_features]` and `[out_features]`.
    pub fn dims(&self) -> (i64, i64) {
        let s = self.weight.size();
        (s[1], s[0])
    }

    /// Base output plus whatever the attached adapter adds.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let base = x.linear(&self.weight, self.bias.as_ref());
        match &self.adapter {
            None => base,
            Some(adapter) => adapter.forward(
                x,
                base,
                &BaseLinear {
                    weight: &self.weight,
                    bias: self.bias.as_ref(),
                },
            ),
        }
    }
}

/// Root-mean-square layer norm computed as transformers' `LlamaRMSNorm` does
/// (in fp32, then cast back before the weight is applied), or, with
/// `scale_in_fp32`, as `Gemma3RMSNorm` does (the weight applied in fp32,
/// then cast back).
pub struct RmsNorm {
    /// `[hidden_size]`; for Gemma's norms `1 + w` in fp32, computed once at load.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
    /// Multiply by the weight before casting back (Gemma), not after (Llama).
    pub scale_in_fp32: bool,
}

impl RmsNorm {
    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(tch::Kind::Float);
        let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, tch::Kind::Float);
        let h = h * (variance + self.eps).rsqrt();
        if self.scale_in_fp32 {
            (h * &self.weight).to_kind(kind)
        } else {
            &self.weight * h.to_kind(kind)
        }
    }
}
