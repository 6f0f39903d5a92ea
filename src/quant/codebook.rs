//! The code books: the 16 values of NF4 and FP4, and the 256-value dynamic
//! map that double quantization uses for the absmax values.

use std::fmt;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// The 4-bit data type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    /// NormalFloat4: 16 quantiles of N(0, 1) scaled to [-1, 1] (QLoRA).
    Nf4,
    /// A 4-bit float: 1 sign, 2 exponent and 1 mantissa bit, scaled to [-1, 1].
    Fp4,
}

/// NF4 as `bitsandbytes.functional.get_4bit_type("nf4")` lists it. The
/// values are decimal Python floats there, which torch rounds to f64 and
/// then f32; they are kept as f64 here and narrowed the same way, because
/// rounding the decimal straight to f32 could differ in the last bit.
const NF4_F64: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// FP4 in bit-pattern order before normalisation (bitsandbytes' table:
/// sign bit 8, then 0b000 = 0, 0b001 = 0.0625 (subnormal), 0b010 = 8, ...).
/// bitsandbytes writes the negative zero as the integer `-0`, so its code
/// book holds +0 at index 8.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

impl QuantType {
    /// The name bitsandbytes and transformers use (`nf4`, `fp4`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parses `nf4` or `fp4`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => bail!("unknown 4-bit quant type `{other}` (bitsandbytes has nf4 and fp4)"),
        }
    }

    /// The 16 values in code order, exactly as
    /// `bitsandbytes.functional.get_4bit_type` returns them (the `quant_map`
    /// a checkpoint stores).
    pub fn code(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4_F64.map(|v| v as f32),
            // get_4bit_type divides by the largest magnitude (12) in f32.
            QuantType::Fp4 => FP4_RAW.map(|v| v / 12.0),
        }
    }

    /// [`QuantType::code`] as an f32 tensor on `device`.
    pub fn code_tensor(self, device: Device) -> Tensor {
        host_table(&self.code(), device)
    }

    /// The boundaries values are bucketed against and the map from sorted
    /// position back to code, as bitsandbytes' default quantize_4bit builds
    /// them: `order = argsort(code)`, midpoints of neighbouring sorted values.
    /// FP4 has two zeros (codes 0 and 8); which one a value of either sign
    /// near zero gets depends on argsort's order for the tie, so argsort is
    /// run by libtorch on the CPU exactly as bitsandbytes runs it, not
    /// hard-coded.
    pub(crate) fn bounds_and_order(self, device: Device) -> (Tensor, Tensor) {
        let code = self.code_tensor(Device::Cpu);
        let order = code.argsort(0, false);
        let sorted = code.index_select(0, &order);
        let bounds = (sorted.narrow(0, 0, 15) + sorted.narrow(0, 1, 15)) / 2.0;
        (bounds.to_device(device), order.to_device(device))
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

thread_local! {
    static HOST_TABLES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A table of host values as a tensor on `device`: on a GPU a blocking
/// host-to-device copy, which is why it is made once per weight, at load,
/// and never in a forward pass. Every table of this module is made here.
fn host_table(values: &[f32], device: Device) -> Tensor {
    HOST_TABLES.with(|n| n.set(n.get() + 1));
    Tensor::from_slice(values).to_device(device)
}

/// How many host tables this thread has turned into tensors (a test's
/// witness that dequantization copies nothing from the host).
pub fn host_tables_made() -> usize {
    HOST_TABLES.with(std::cell::Cell::get)
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`, the code
/// of the nested absmax quantization), sorted, 256 f32 values on `device`.
///
/// It is derived as bitsandbytes derives it — for exponent i in 0..7,
/// the 2^i midpoints of `linspace(0.1, 1, 2^i + 1)` scaled by 10^(i-6), both
/// signs, plus 0 and 1 — with libtorch's own linspace and f32 arithmetic, so
/// that every value is the one bitsandbytes computes.
pub fn dynamic_map(device: Device) -> Tensor {
    // 10 ** (i - 6) as Python evaluates it (a correctly rounded double).
    const SCALE: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut parts = Vec::with_capacity(16);
    for (i, scale) in SCALE.into_iter().enumerate() {
        let items = (1i64 << i) + 1;
        let b = Tensor::linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu));
        let means = (b.narrow(0, 0, items - 1) + b.narrow(0, 1, items - 1)) / 2.0;
        // Python multiplies the f32 tensor by the scalar 10 ** (i - 6).
        let scaled = means * scale;
        parts.push(-&scaled);
        parts.push(scaled);
    }
    parts.push(host_table(&[0f32, 1.0], Device::Cpu));
    let (sorted, _) = Tensor::cat(&parts, 0).sort(0, false);
    let sorted = Vec::<f32>::try_from(&sorted).expect("an f32 map");
    host_table(&sorted, device)
}
