//! The frozen weight of a linear layer as it is held: dense, or quantized
//! as bitsandbytes stores it and dequantized just in time.

use std::sync::Arc;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use crate::dist::fsdp::ShardedWeight;

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
    /// This rank's slice of one of the above (`--fsdp`): whole only while
    /// its FSDP unit is gathered (see [`crate::dist::fsdp`]).
    Sharded(Arc<ShardedWeight>),
}

impl FrozenWeight {
    /// `[out_features, in_features]`.
    pub fn size(&self) -> Vec<i64> {
        match self {
            Self::Dense(t) => t.size(),
            Self::FourBit { q, .. } => q.shape.clone(),
            Self::Int8 { w, .. } => w.cb.size(),
            Self::Sharded(s) => s.size(),
        }
    }

    /// Number of values of the (unquantized) weight.
    pub fn numel(&self) -> i64 {
        self.size().iter().product()
    }

    /// Whether the weight is held quantized.
    pub fn is_quantized(&self) -> bool {
        match self {
            Self::Dense(_) => false,
            Self::Sharded(s) => s.is_quantized(),
            _ => true,
        }
    }

    /// The dtype the layer computes in.
    pub fn compute_kind(&self) -> Kind {
        match self {
            Self::Dense(t) => t.kind(),
            Self::FourBit { compute, .. } | Self::Int8 { compute, .. } => *compute,
            Self::Sharded(s) => s.compute_kind(),
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
            Self::Sharded(s) => s.with_whole(FrozenWeight::dense),
        }
    }

    /// `x Wᵀ + bias` with `x` in the compute dtype, as bitsandbytes'
    /// `Linear4bit` and `Linear8bitLt` compute it. Where autograd needs the
    /// input's gradient through a 4-bit weight, one operation that keeps only
    /// the packed weight for the backward pass (bitsandbytes' `MatMul4Bit`);
    /// elsewhere the weight is dequantized for this product and dropped.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        if let Self::Sharded(s) = self {
            return s.with_whole(|w| w.linear(x, bias));
        }
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
            Self::Sharded(s) => s.held_bytes(),
        }
    }

    /// The tensors the weight is stored in, in a fixed order (what FSDP
    /// shards and gathers as bytes): the dense weight; the packed 4-bit
    /// codes, absmax, code book and the nested absmax and code book; the
    /// int8 codes and row scales.
    pub fn parts(&self) -> Vec<&Tensor> {
        match self {
            Self::Dense(t) => vec![t],
            Self::FourBit { q, .. } => {
                let mut v = vec![&q.data, &q.absmax, &q.code];
                if let Some(n) = &q.nested {
                    v.extend([&n.absmax, &n.code]);
                }
                v
            }
            Self::Int8 { w, .. } => vec![&w.cb, &w.scb],
            Self::Sharded(_) => vec![],
        }
    }

    /// This weight with its [`FrozenWeight::parts`] replaced by `parts`
    /// (the same shapes and dtypes), everything else kept.
    pub fn with_parts(&self, mut parts: Vec<Tensor>) -> Self {
        let mut next = || parts.remove(0);
        match self {
            Self::Dense(_) => Self::Dense(next()),
            Self::FourBit { q, compute } => {
                let (data, absmax, code) = (next(), next(), next());
                let nested = q.nested.as_ref().map(|n| super::four_bit::NestedAbsmax {
                    absmax: next(),
                    code: next(),
                    offset: n.offset,
                    blocksize: n.blocksize,
                });
                Self::FourBit {
                    q: Quantized4bit {
                        data,
                        absmax,
                        code,
                        nested,
                        quant_type: q.quant_type,
                        blocksize: q.blocksize,
                        shape: q.shape.clone(),
                        dtype: q.dtype,
                    },
                    compute: *compute,
                }
            }
            Self::Int8 { compute, .. } => Self::Int8 {
                w: Int8Weight {
                    cb: next(),
                    scb: next(),
                },
                compute: *compute,
            },
            Self::Sharded(s) => Self::Sharded(s.clone()),
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
            Self::Sharded(_) => {
                bail!("a base sharded over ranks (--fsdp) cannot be changed in place; merge the saved adapter with `peft-rs merge`")
            }
        }
        Ok(())
    }
}
