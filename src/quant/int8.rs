//! LLM.int8 weight quantization as transformers' `load_in_8bit` stores it.
//!
//! bitsandbytes' `Int8Params` first casts the weight to f16, then
//! `int8_vectorwise_quant` takes each row's largest magnitude `SCB` (f32) and
//! stores `CB = round(w * (127 / SCB))` as int8 (round half to even). A saved
//! checkpoint holds `weight` (CB), `SCB` and `weight_format` (0, row-major).
//!
//! The reference is the CPU path, bitsandbytes' PyTorch kernel, which computes
//! `127 / SCB` as Python does: `SCB.reciprocal() * 127`. The CUDA kernel
//! computes `val * __fdividef(127, SCB)` (an approximate division), so on a GPU
//! a value that lands within an ulp of a half-integer can round the other way.
//! Rows of zeros, where the CPU kernel's arithmetic is undefined (0 * inf),
//! get codes 0 here — what the CPU kernel yields on x86.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// `7.874015718698502e-3`, the 1/127 bitsandbytes multiplies by (not divides by).
const INV_127: f64 = 7.874015718698502e-3;

/// An int8 weight with its row scales.
#[derive(Debug)]
pub struct Int8Weight {
    /// int8 `[out, in]`: the codes (`CB`, saved as `weight`).
    pub cb: Tensor,
    /// f32 `[out]`: each row's largest magnitude after the f16 cast (`SCB`).
    pub scb: Tensor,
}

/// Quantizes a 2-D float weight row by row as `Int8Params` does when
/// transformers loads a model with `load_in_8bit=True`. Runs on the weight's device.
pub fn quantize_int8(weight: &Tensor) -> Result<Int8Weight> {
    let kind = weight.kind();
    ensure!(
        matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16),
        "int8 quantization takes f32, f16 or bf16 weights, got {kind:?}"
    );
    ensure!(
        weight.dim() == 2 && weight.numel() > 0,
        "int8 quantization takes a non-empty [out, in] weight, got shape {:?}",
        weight.size()
    );
    // Int8Params quantizes the f16 copy, whatever the checkpoint's dtype.
    let w = weight.detach().to_kind(Kind::Half);
    ensure!(
        w.isfinite().all().int64_value(&[]) == 1,
        "the weight has NaN or infinite values once cast to f16 (|w| > 65504?); int8 quantization needs finite f16 weights"
    );
    let scb = w.abs().amax([1], false).to_kind(Kind::Float);
    // Python's `127.0 / row_stats` is `row_stats.reciprocal() * 127.0`.
    let scale = scb.reciprocal() * 127.0;
    let zero_rows = scb.eq(0.0).unsqueeze(1);
    let cb = (w * scale.unsqueeze(1))
        .round()
        .masked_fill(&zero_rows, 0.0)
        .to_kind(Kind::Int8);
    Ok(Int8Weight { cb, scb })
}

impl Int8Weight {
    /// The weight back as `CB * SCB * (1/127)` in f32 (bitsandbytes'
    /// `int8_vectorwise_dequant`), converted to `kind` on `device`.
    pub fn dequantize(&self, kind: Kind, device: Device) -> Tensor {
        (self.cb.to_device(device) * self.scb.to_device(device).view([-1, 1]) * INV_127)
            .to_kind(kind)
    }

    /// Bytes held: one per value plus an f32 scale per row.
    pub fn frozen_bytes(&self) -> usize {
        self.cb.numel() + 4 * self.scb.numel()
    }

    /// Checks that `cb` is int8 `[out, in]` and `scb` f32 `[out]`; `what`
    /// names the weight in the error.
    pub fn check(&self, what: &str) -> Result<()> {
        let s = self.cb.size();
        ensure!(
            self.cb.kind() == Kind::Int8 && s.len() == 2,
            "{what}: weight is {:?} {s:?}, expected int8 [out, in]",
            self.cb.kind()
        );
        ensure!(
            self.scb.kind() == Kind::Float && self.scb.size() == [s[0]],
            "{what}: SCB is {:?} {:?}, expected f32 [{}]",
            self.scb.kind(),
            self.scb.size(),
            s[0]
        );
        ensure!(
            bool::try_from(self.scb.isfinite().logical_and(&self.scb.ge(0.0)).all())?,
            "{what}: SCB holds NaN, infinite or negative row scales; the checkpoint is broken"
        );
        Ok(())
    }
}
