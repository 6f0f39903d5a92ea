//! The building blocks the model files share: a frozen linear layer that may
//! carry an adapter (and may hold its weight quantized), an embedding, an RMS
//! norm, and the hook interface through which activations can be observed or
//! changed at named module paths.

use anyhow::Result;
use peft_adapters::{BaseLinear, LayerInput, LinearAdapter};
use tch::{Kind, Tensor};

use crate::quant::{quantize_4bit, quantize_int8, Int8Weight, Quantized4bit};

/// The frozen weight of a [`Linear`]: dense, or quantized as bitsandbytes
/// stores it and dequantized just in time in each forward pass.
pub enum FrozenWeight {
    /// `[out_features, in_features]` in the model dtype, never requires grad.
    Dense(Tensor),
    /// NF4 or FP4 (bitsandbytes' `Linear4bit`).
    FourBit {
        /// Packed codes and quant state.
        q: Quantized4bit,
        /// `bnb_4bit_compute_dtype`: the dtype the matmul runs in.
        compute: Kind,
    },
    /// LLM.int8 codes with row scales (bitsandbytes' `Linear8bitLt`).
    Int8 {
        /// Codes and scales.
        w: Int8Weight,
        /// The dtype the matmul runs in (the model dtype).
        compute: Kind,
    },
}

impl FrozenWeight {
    /// `[out_features, in_features]`.
    pub fn size(&self) -> Vec<i64> {
        match self {
            Self::Dense(t) => t.size(),
            Self::FourBit { q, .. } => q.shape.clone(),
            Self::Int8 { w, .. } => w.cb.size(),
        }
    }

    /// Number of values of the (unquantized) weight.
    pub fn numel(&self) -> i64 {
        self.size().iter().product()
    }

    /// Whether the weight is held quantized.
    pub fn is_quantized(&self) -> bool {
        !matches!(self, Self::Dense(_))
    }

    /// The dtype the layer computes in.
    pub fn compute_kind(&self) -> Kind {
        match self {
            Self::Dense(t) => t.kind(),
            Self::FourBit { compute, .. } | Self::Int8 { compute, .. } => *compute,
        }
    }

    /// The weight as a dense tensor in the compute dtype: the tensor itself
    /// when dense, else dequantized as bitsandbytes does
    /// (`dequantize_4bit(...).to(compute_dtype)`), a fresh tensor that
    /// requires no grad and lives as long as the caller keeps it.
    pub fn dense(&self) -> Tensor {
        match self {
            Self::Dense(t) => t.shallow_clone(),
            Self::FourBit { q, compute } => {
                let d = q.data.device();
                // bitsandbytes rounds the f32 products to the weight's dtype,
                // then to the compute dtype; one rounding gives the same
                // bits when either of the two is the identity.
                if q.dtype == Kind::Float || q.dtype == *compute {
                    q.dequantize(*compute, d)
                } else {
                    q.dequantize(q.dtype, d).to_kind(*compute)
                }
            }
            Self::Int8 { w, compute } => w.dequantize(*compute, w.cb.device()),
        }
    }

    /// Bytes the frozen weight holds in memory.
    pub fn frozen_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.numel() * t.kind().elt_size_in_bytes(),
            Self::FourBit { q, .. } => q.frozen_bytes(),
            Self::Int8 { w, .. } => w.frozen_bytes(),
        }
    }

    /// Replaces the weight by `new` (dense, fp32 or the compute dtype),
    /// quantized again the way it was quantized before (what PEFT's
    /// `Linear4bit.merge` does: dequantize, change, re-quantize).
    pub fn replace(&mut self, new: &Tensor) -> Result<()> {
        match self {
            Self::Dense(t) => *t = new.to_kind(t.kind()),
            Self::FourBit { q, .. } => {
                let n = quantize_4bit(&new.to_kind(q.dtype), q.quant_type, q.nested.is_some())?;
                *q = n;
            }
            Self::Int8 { w, compute } => *w = quantize_int8(&new.to_kind(*compute))?,
        }
        Ok(())
    }
}

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
        let x = input.tensor();
        let (weight, base) = match &self.weight {
            FrozenWeight::Dense(w) => (w.shallow_clone(), x.linear(w, self.bias.as_ref())),
            q => {
                let compute = q.compute_kind();
                let w = q.dense();
                let bias = self.bias.as_ref().map(|b| b.to_kind(compute));
                let base = x
                    .to_kind(compute)
                    .linear(&w, bias.as_ref())
                    .to_kind(x.kind());
                (w, base)
            }
        };
        match &self.adapter {
            None => base,
            Some(adapter) => adapter.forward(
                input,
                base,
                &BaseLinear {
                    weight: &weight,
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
