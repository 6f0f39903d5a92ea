//! The building blocks the model files share: a frozen linear layer that may
//! carry an adapter (its weight dense or quantized, see
//! [`crate::quant::FrozenWeight`]) and an RMS norm. The points where
//! activations may be changed are [`peft_regularizers::hooks`].

use peft_adapters::{BaseLinear, LayerInput, LinearAdapter};
use tch::Tensor;

use crate::quant::FrozenWeight;

/// A frozen `y = x Wᵀ + b` whose output an adapter may change.
///
/// The model code calls [`Linear::forward`] and never knows whether, or which,
/// adapter is attached, nor whether the weight is quantized: adapters wrap the
/// layer the way PEFT's `LoraLayer` wraps `base_layer`.
pub struct Linear {
    /// `[out_features, in_features]`, dense or quantized; never requires grad.
    pub weight: FrozenWeight,
    /// `[out_features]`, never requires grad.
    pub bias: Option<Tensor>,
    /// The adapter wrapping this layer, if any.
    pub adapter: Option<Box<dyn LinearAdapter>>,
}

impl Linear {
    /// A dense layer without adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_weight(FrozenWeight::Dense(weight), bias)
    }

    /// A layer without adapter holding `weight`.
    pub fn with_weight(weight: FrozenWeight, bias: Option<Tensor>) -> Self {
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
    ///
    /// A quantized weight is dequantized here into the compute dtype and the
    /// input cast to it, as bitsandbytes' `Linear4bit.forward` does; the
    /// result is cast back to the input's dtype. The dequantized weight is a
    /// temporary: autograd keeps it for the input gradient only while this
    /// layer's graph lives (one layer at a time with gradient checkpointing).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let [y] = forward_same_input([self], x);
        y
    }

    /// The layer on a `[tokens, in_features]` input shared with other layers.
    fn forward_rows(&self, input: &LayerInput) -> Tensor {
        // IA³ on a feed-forward module rescales what the frozen layer reads.
        let rescaled = self
            .adapter
            .as_ref()
            .and_then(|a| a.base_input(input.tensor()));
        let x = rescaled.as_ref().unwrap_or(input.tensor());
        let base = match &self.weight {
            FrozenWeight::Dense(w) => x.linear(w, self.bias.as_ref()),
            q => {
                let compute = q.compute_kind();
                let bias = self.bias.as_ref().map(|b| b.to_kind(compute));
                q.linear(&x.to_kind(compute), bias.as_ref())
                    .to_kind(x.kind())
            }
        };
        match &self.adapter {
            None => base,
            // The dense weight is made only for adapters that read it (DoRA).
            Some(adapter) => adapter.forward(
                input,
                base,
                &BaseLinear {
                    weight: &|| self.weight.dense(),
                    bias: self.bias.as_ref(),
                },
            ),
        }
    }
}

/// The outputs of linear layers that read the same input `x` (`[..., in]`):
/// a decoder layer's query, key and value projections, or its gate and up
/// projections. Adapters on them may share work on the input (one LoRA
/// dropout draw instead of one per layer).
///
/// Layers compute on `x` seen as `[tokens, in]`, so that adapters can add
/// their output into the base output's storage (a view would make autograd
/// copy the whole gradient in backward).
pub fn forward_same_input<const N: usize>(layers: [&Linear; N], x: &Tensor) -> [Tensor; N] {
    let size = x.size();
    let inner = size.last().copied().unwrap_or(1);
    let rows = x.reshape([-1, inner]);
    let input = LayerInput::new(&rows);
    layers.map(|layer| {
        let y = layer.forward_rows(&input);
        let mut out = size.clone();
        if let (Some(last), Some(&o)) = (out.last_mut(), y.size().last()) {
            *last = o;
        }
        y.reshape(out.as_slice())
    })
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
    /// Normalises over the last dimension: fused on the CPU
    /// ([`crate::fused_norm`]), as ATen ops elsewhere.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        crate::fused_norm::rms_norm(x, &self.weight, self.eps, self.scale_in_fp32)
            .unwrap_or_else(|| self.forward_aten(x))
    }

    /// The norm as transformers writes it, in ATen ops.
    pub fn forward_aten(&self, x: &Tensor) -> Tensor {
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
