//! The frozen weight of a linear layer as it is held: dense, or quantized
//! as bitsandbytes stores it and dequantized just in time.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{quantize_4bit, quantize_int8, Int8Weight, Quantized4bit};

/// The frozen weight of a [`crate::nn::Linear`]: dense, or quantized as bitsandbytes
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
            Self::FourBit { q, compute } => super::matmul_4bit::dense_4bit(q, *compute),
            Self::Int8 { w, compute } => w.dequantize(*compute, w.cb.device()),
        }
    }

    /// `x Wᵀ + bias` with `x` in the compute dtype, as bitsandbytes'
    /// `Linear4bit` and `Linear8bitLt` compute it. Where autograd needs the
    /// input's gradient through a 4-bit weight, one operation that keeps only
    /// the packed weight for the backward pass (bitsandbytes' `MatMul4Bit`);
    /// elsewhere the weight is dequantized for this product and dropped.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        if let (Self::FourBit { q, compute }, true) = (self, x.requires_grad()) {
            if let Some(y) = super::matmul_4bit::matmul_4bit(x, q, *compute) {
                return match bias {
                    Some(b) => y + b,
                    None => y,
                };
            }
        }
        x.linear(&self.dense(), bias)
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
