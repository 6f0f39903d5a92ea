//! 4-bit blockwise quantization as bitsandbytes computes it on the CPU.
//!
//! Quantization (bitsandbytes' `quantize_4bit`, default PyTorch kernel, which
//! is what runs on the CPU):
//! - the weight is flattened and read in f32; blocks of 64 consecutive values
//!   share one absmax, the largest magnitude in the block;
//! - a full block is scaled by `x * (1 / max(absmax, 1e-38))`, the last partial
//!   block by `x / max(absmax, 1e-38)` (a true division: the two can differ in
//!   the last bit), then clamped to [-1, 1];
//! - the stored absmax of a full block is the raw maximum (0 for a block of
//!   zeros), that of a partial last block the clamped one (1e-38 as f32 for a
//!   tail of zeros);
//! - each scaled value gets the code whose sorted position `bucketize` finds
//!   among the midpoints of the sorted code book: a value exactly on a midpoint
//!   goes to the lower code;
//! - codes are packed two per byte, the first value of each pair in the high
//!   nibble; an odd count is padded with a zero value; the packed tensor has
//!   shape `[(n + 1) / 2, 1]`.
//!
//! Double quantization: `offset = mean(absmax)`, and `absmax - offset` is
//! quantized by bitsandbytes' native CPU kernel in blocks of 256 with the
//! 8-bit dynamic map ([`quantize_blockwise`]).
//!
//! Dequantization multiplies the code value by the block's absmax in f32 and
//! converts to the output dtype (round to nearest even), in flat blocks, as
//! bitsandbytes defines it (its PyTorch implementation, its scalar CPU kernel
//! and its CUDA kernel). Where its kernels differ: the scalar CPU and the
//! CUDA kernel decode FP4's code 8 (sign bit, magnitude 0) as -0.0, the code
//! book (its PyTorch implementation, its AVX512 CPU kernel, peft-rs) as +0.0,
//! the same value; and its AVX512 CPU kernel (0.50) decodes a weight whose
//! rows are a multiple of 16 values but not of the block size with the wrong
//! block scales. Real checkpoints have rows of multiples of 64, where all
//! agree.
//!
//! Where bitsandbytes' CUDA kernel differs (read from its source, not run
//! here): it scales every block, the partial last one included, by
//! `x * (1 / absmax)` and picks codes with a decision tree whose thresholds
//! are typed-in decimals, so a value on the edge of a partial block or within
//! an ulp of a threshold can get the neighbouring code; FP4 takes the sign
//! from `x < 0`, giving code 0 to tiny positive values where the CPU gives
//! code 8; a block of zeros computes 0 * inf. The bytes here are the CPU's.

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

use super::codebook::{dynamic_map, QuantType};

/// Values per absmax block (bitsandbytes' and transformers' default).
pub const BLOCKSIZE: i64 = 64;
/// Absmax values per nested block under double quantization.
pub const NESTED_BLOCKSIZE: i64 = 256;
/// The block sizes bitsandbytes accepts for 4-bit quantization.
pub const VALID_BLOCKSIZES: [i64; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The second level of double quantization: the per-block absmax values,
/// minus their mean, quantized to 8 bits in blocks of 256.
#[derive(Debug)]
pub struct NestedAbsmax {
    /// The mean of the absmax values, subtracted before quantizing (`nested_offset`).
    pub offset: f32,
    /// f32 `[ceil(blocks / blocksize)]`: the absmax of each nested block (`nested_absmax`).
    pub absmax: Tensor,
    /// f32 `[256]`: the dynamic map the codes index (`nested_quant_map`).
    pub code: Tensor,
    /// Absmax values per nested block (`nested_blocksize`, 256).
    pub blocksize: i64,
}

/// A 4-bit quantized weight: what bitsandbytes' `QuantState` and the packed
/// `Params4bit` data hold, field for field.
#[derive(Debug)]
pub struct Quantized4bit {
    /// uint8 `[(n + 1) / 2, 1]`: two codes per byte, first value in the high nibble.
    pub data: Tensor,
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Values per absmax block (64).
    pub blocksize: i64,
    /// `[ceil(n / blocksize)]`: f32 absmax per block, or with double
    /// quantization the uint8 codes of `absmax - offset` (`weight.absmax`).
    pub absmax: Tensor,
    /// f32 `[16]`: the 4-bit code book (`weight.quant_map`).
    pub code: Tensor,
    /// The nested quantization of `absmax`, when double quantization is on.
    pub nested: Option<NestedAbsmax>,
    /// The shape of the original weight.
    pub shape: Vec<i64>,
    /// The dtype of the original weight (what bitsandbytes dequantizes to).
    pub dtype: Kind,
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16)
}

fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    // bitsandbytes quantizes NaN and infinity to meaningless codes without a
    // word; a frozen base built from such a weight is better refused.
    ensure!(
        t.isfinite().all().int64_value(&[]) == 1,
        "{what} has NaN or infinite values; quantization needs finite weights"
    );
    Ok(())
}

/// Quantizes a float weight (f32, f16 or bf16, any shape) to 4 bits in blocks
/// of [`BLOCKSIZE`], as `bitsandbytes.functional.quantize_4bit(weight,
/// blocksize=64, quant_type, compress_statistics=double_quant)` does on the CPU.
/// Runs on the weight's device.
pub fn quantize_4bit(
    weight: &Tensor,
    quant_type: QuantType,
    double_quant: bool,
) -> Result<Quantized4bit> {
    let dtype = weight.kind();
    ensure!(
        is_float(dtype),
        "4-bit quantization takes f32, f16 or bf16 weights, got {dtype:?}"
    );
    let shape = weight.size();
    ensure!(
        !shape.is_empty() && weight.numel() > 0,
        "4-bit quantization needs a non-empty weight with at least one dimension, got shape {shape:?}"
    );
    let device = weight.device();
    let a = weight.detach().reshape([-1]).to_kind(Kind::Float);
    let (data, absmax) = if device == Device::Cpu {
        codes_on_host(&a, quant_type)?
    } else {
        check_finite(&a, "the weight")?;
        codes_by_tensors(&a, quant_type)
    };

    let (absmax, nested) = if double_quant {
        let offset = absmax.mean(None::<Kind>);
        let centered = &absmax - &offset;
        let code = dynamic_map(device);
        let (q8, nested_absmax) = quantize_blockwise(&centered, &code, NESTED_BLOCKSIZE)?;
        let nested = NestedAbsmax {
            offset: offset.double_value(&[]) as f32,
            absmax: nested_absmax,
            code,
            blocksize: NESTED_BLOCKSIZE,
        };
        (q8, Some(nested))
    } else {
        (absmax, None)
    };
    Ok(Quantized4bit {
        data,
        quant_type,
        blocksize: BLOCKSIZE,
        absmax,
        code: quant_type.code_tensor(device),
        nested,
        shape,
        dtype,
    })
}

/// The packed codes (`[(n + 1) / 2, 1]` uint8) and the f32 absmax of each
/// block of `a` (flat f32, finite), by tensor operations on its device.
fn codes_by_tensors(a: &Tensor, quant_type: QuantType) -> (Tensor, Tensor) {
    let device = a.device();
    let n = a.numel() as i64;
    let bs = BLOCKSIZE;
    let rem = n % bs;
    let full = n - rem;
    let mut absmax = Vec::with_capacity(2);
    let mut scaled = Vec::with_capacity(3);
    if full > 0 {
        let blocks = a.narrow(0, 0, full).view([full / bs, bs]);
        let am = blocks.abs().amax([1], false);
        // Python's `1.0 / t` is `t.reciprocal() * 1.0`: a reciprocal, then a
        // product — not a division of each value by absmax.
        let recip = am.clamp_min(1e-38).reciprocal();
        scaled.push((blocks * recip.unsqueeze(1)).clamp(-1.0, 1.0).reshape([-1]));
        absmax.push(am);
    }
    if rem > 0 {
        let tail = a.narrow(0, full, rem);
        // The tail's absmax is stored after the clamp (full blocks' before it).
        let am = tail.abs().max().clamp_min(1e-38);
        scaled.push((tail / &am).clamp(-1.0, 1.0));
        absmax.push(am.reshape([1]));
    }
    if n % 2 == 1 {
        scaled.push(Tensor::zeros([1], (Kind::Float, device)));
    }
    let absmax = Tensor::cat(&absmax, 0);
    let scaled = Tensor::cat(&scaled, 0);

    let (bounds, order) = quant_type.bounds_and_order(device);
    let mut q = scaled.bucketize(&bounds, false, false);
    if quant_type != QuantType::Nf4 {
        // NF4's code book is sorted; FP4's sorted positions map back to codes.
        q = order.index_select(0, &q);
    }
    let pairs = q.view([-1, 2]);
    let data = (pairs.select(1, 0) * 16 + pairs.select(1, 1))
        .to_kind(Kind::Uint8)
        .view([-1, 1]);
    (data, absmax)
}

/// Blocks per task of [`codes_on_host`].
const HOST_TASK_BLOCKS: usize = 512;

/// [`codes_by_tensors`] on the host, in one parallel pass over `a` (flat f32
/// on the CPU) that also refuses a value that is not finite: the same f32
/// arithmetic value for value (a product by the block's reciprocal, a true
/// division in the partial last block, the clamp, the count of midpoints
/// below), where the tensor path makes seven passes over the weight and a
/// 64-bit index per value (24 ns a value here; an 8B model's quantize-at-load
/// took 250 s).
fn codes_on_host(a: &Tensor, quant_type: QuantType) -> Result<(Tensor, Tensor)> {
    let a = a.contiguous();
    let n = a.numel();
    // SAFETY: `a` is a contiguous f32 tensor on the CPU of `n` values, alive
    // and unchanged while the slice is read.
    let values = unsafe { std::slice::from_raw_parts(a.data_ptr() as *const f32, n) };
    let (bounds, order) = quant_type.bounds_and_order(Device::Cpu);
    let bounds = Vec::<f32>::try_from(&bounds)?;
    // Sorted position to code (NF4's code book is sorted: the identity).
    let order: Vec<u8> = Vec::<i64>::try_from(&order)?
        .iter()
        .map(|&o| o as u8)
        .collect();
    let bounds: [f32; 15] = bounds
        .try_into()
        .map_err(|b| anyhow::anyhow!("15 midpoints, got {b:?}"))?;
    // ATen's clamp_min(1e-38) on f32: the double rounded to f32.
    let tiny = 1e-38f64 as f32;
    let bs = BLOCKSIZE as usize;
    let full = n - n % bs;
    let mut data = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(bs)];
    use rayon::prelude::*;
    let finite = values[..full]
        .par_chunks(bs * HOST_TASK_BLOCKS)
        .zip(data[..full / 2].par_chunks_mut(bs / 2 * HOST_TASK_BLOCKS))
        .zip(absmax[..full / bs].par_chunks_mut(HOST_TASK_BLOCKS))
        .map(|((x, d), am)| {
            let mut finite = true;
            let mut scaled = [0f32; BLOCKSIZE as usize];
            let mut codes = [0u8; BLOCKSIZE as usize];
            for ((block, d), am) in x.chunks_exact(bs).zip(d.chunks_exact_mut(bs / 2)).zip(am) {
                finite &= block.iter().all(|v| v.is_finite());
                *am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let recip = 1.0 / am.max(tiny);
                for (s, v) in scaled.iter_mut().zip(block) {
                    *s = v * recip;
                }
                sorted_codes(&scaled, &bounds, &mut codes);
                pack(&codes, &order, d);
            }
            finite
        })
        .reduce(|| true, |a, b| a && b);
    let tail = &values[full..];
    ensure!(
        finite && tail.iter().all(|v| v.is_finite()),
        "the weight has NaN or infinite values; quantization needs finite weights"
    );
    if !tail.is_empty() {
        let am = tail.iter().fold(0f32, |m, v| m.max(v.abs())).max(tiny);
        absmax[full / bs] = am;
        // An odd count is padded with a zero value.
        let scaled: Vec<f32> = tail.iter().map(|&v| v / am).chain([0.0]).collect();
        let mut codes = vec![0u8; scaled.len()];
        sorted_codes(&scaled, &bounds, &mut codes);
        pack(&codes, &order, &mut data[full / 2..]);
    }
    Ok((
        Tensor::from_slice(&data).view([-1, 1]),
        Tensor::from_slice(&absmax),
    ))
}

/// Each scaled value's sorted code position: clamped to [-1, 1], the number
/// of midpoints below it (`bucketize`'s answer), counted one midpoint at a
/// time over the whole block so that the comparisons vectorize.
fn sorted_codes(scaled: &[f32], bounds: &[f32; 15], codes: &mut [u8]) {
    codes.fill(0);
    for &b in bounds {
        for (q, &s) in codes.iter_mut().zip(scaled) {
            *q += u8::from(b < s.clamp(-1.0, 1.0));
        }
    }
}

/// Two codes a byte, the first in the high nibble, each sorted position
/// mapped to its code through `order`; a trailing odd code is left out.
fn pack(codes: &[u8], order: &[u8], out: &mut [u8]) {
    for (d, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
        *d = order[usize::from(pair[0])] << 4 | order[usize::from(pair[1])];
    }
}

/// The 65536-entry table bitsandbytes' CPU kernel uses instead of a nearest
/// search: the interval [-1, 1] cut into 65536 grid points
/// `2i / 65535 - 1` (f32), each mapped to the number of code midpoints below
/// it — exactly what `bucketize` with `right = false` counts.
fn grid_lut(code: &Tensor) -> Tensor {
    let device = code.device();
    let k = code.size()[0];
    let mid = (code.narrow(0, 0, k - 1) + code.narrow(0, 1, k - 1)) * 0.5;
    let grid = Tensor::arange(65536, (Kind::Float, device)) * 2.0 / 65535.0 - 1.0;
    grid.bucketize(&mid, false, false)
}

/// bitsandbytes' 8-bit blockwise quantization of an f32 tensor as its native
/// CPU kernel (`cquantize_blockwise_cpu_fp32`) computes it: per block the
/// largest magnitude `m`; a block with `m = 0` gets code 0; otherwise each
/// value becomes `lut[trunc(((clamp(x * (1/m), -1, 1) + 1) * 0.5) * 65535 + 0.5)]`
/// with the grid table of [`grid_lut`]. The grid can put a value one code away
/// from the nearest one; this is the CPU's answer, which the nested absmax of
/// double quantization is made of.
///
/// The kernel fuses the last multiply-add; in f32, for every possible input,
/// the fused and unfused forms truncate to the same grid index (checked over
/// all f32 values in [0, 2]: adding 0.5 moves the sum by a multiple of the
/// product's ulp except where it crosses a power of two, and there the floor
/// cannot change), so the unfused tensor arithmetic here gives the same index.
///
/// Returns the uint8 codes (shape of `x`) and the f32 absmax per block.
pub fn quantize_blockwise(x: &Tensor, code: &Tensor, blocksize: i64) -> Result<(Tensor, Tensor)> {
    ensure!(
        x.kind() == Kind::Float,
        "8-bit blockwise quantization takes f32, got {:?}",
        x.kind()
    );
    ensure!(blocksize > 0, "blocksize must be positive, got {blocksize}");
    ensure!(
        code.size() == [256] && code.kind() == Kind::Float,
        "the 8-bit code map must be f32 [256], got {:?} {:?}",
        code.kind(),
        code.size()
    );
    let device = x.device();
    let n = x.numel() as i64;
    let blocks = (n + blocksize - 1) / blocksize;
    let flat = x.reshape([-1]);
    // Zero padding changes no block's largest magnitude and is cut off below.
    let padded = flat
        .constant_pad_nd([0, blocks * blocksize - n])
        .view([blocks, blocksize]);
    let absmax = padded.abs().amax([1], false);
    let zero = absmax.eq(0.0);
    // 1.0f / absmax as the kernel divides; zero blocks are overwritten below
    // (and kept finite here so that no NaN reaches the integer conversion).
    let inv = absmax.reciprocal().masked_fill(&zero, 0.0);
    let v = (padded * inv.unsqueeze(1)).clamp(-1.0, 1.0);
    let grid = ((v + 1.0) * 0.5) * 65535.0 + 0.5;
    // A subnormal block absmax has an infinite reciprocal, and 0 * inf is NaN,
    // which the kernel's float-to-int conversion (cvttss2si) turns into
    // 0x80000000: grid index 0 once cut to 16 bits.
    let index = grid.masked_fill(&grid.isnan(), 0.0).to_kind(Kind::Int64);
    let lut = grid_lut(&code.to_device(device));
    let q = lut
        .index_select(0, &index.view([-1]))
        .view([blocks, blocksize])
        .masked_fill(&zero.unsqueeze(1), 0)
        .to_kind(Kind::Uint8)
        .view([-1])
        .narrow(0, 0, n)
        .view(x.size().as_slice());
    Ok((q, absmax))
}

/// The inverse of [`quantize_blockwise`]: `code[q] * absmax[block]` in f32.
pub fn dequantize_blockwise(q: &Tensor, absmax: &Tensor, code: &Tensor, blocksize: i64) -> Tensor {
    let device = q.device();
    let n = q.numel() as i64;
    let blocks = absmax.size()[0];
    code.to_device(device)
        .index_select(0, &q.reshape([-1]).to_kind(Kind::Int64))
        .constant_pad_nd([0, blocks * blocksize - n])
        .view([blocks, blocksize])
        .g_mul(&absmax.to_device(device).unsqueeze(1))
        .view([-1])
        .narrow(0, 0, n)
}

impl Quantized4bit {
    /// The number of values of the original weight.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// The f32 absmax of every block: stored as is, or recovered from double
    /// quantization as bitsandbytes does (`code[q] * nested_absmax + offset`).
    pub fn block_absmax(&self, device: Device) -> Tensor {
        match &self.nested {
            None => self.absmax.to_device(device),
            Some(nested) => {
                dequantize_blockwise(
                    &self.absmax.to_device(device),
                    &nested.absmax,
                    &nested.code,
                    nested.blocksize,
                ) + f64::from(nested.offset)
            }
        }
    }

    /// The weight back in `kind` on `device`, bit for bit what
    /// `bitsandbytes.functional.dequantize_4bit` returns on the CPU when
    /// `kind` is the original dtype (any float kind is accepted: the f32
    /// product is converted to it).
    ///
    /// A weight held in host memory and wanted there is decoded by one
    /// parallel loop over its bytes; anywhere else by
    /// [`Quantized4bit::dequantize_with_tensor_ops`]. Both give the same bits.
    pub fn dequantize(&self, kind: Kind, device: Device) -> Tensor {
        if device == Device::Cpu && self.data.device() == Device::Cpu {
            return self.dequantize_on_host().to_kind(kind);
        }
        self.dequantize_with_tensor_ops(kind, device)
    }

    /// [`Quantized4bit::dequantize`] with libtorch operations on `device`
    /// (the path of a weight on a GPU; callable on the CPU, where the tests
    /// compare it with the host loop bit for bit). Every tensor it reads is
    /// one the weight holds, so it copies nothing from the host: a byte
    /// indexes a 256 x 2 table of (high, low) code values built on the
    /// device, the block scales multiply in place of a padded copy, and the
    /// product is rounded into `kind` as it is written: three passes over
    /// the weight.
    pub fn dequantize_with_tensor_ops(&self, kind: Kind, device: Device) -> Tensor {
        let n = self.numel();
        let bs = self.blocksize;
        let table = self.code.to_device(device);
        // Byte b decodes to (table[b >> 4], table[b & 15]).
        let byte = Tensor::arange(256, (Kind::Int64, device));
        let pairs = Tensor::stack(
            &[
                table.index_select(0, &byte.floor_divide_scalar(16)),
                table.index_select(0, &byte.remainder(16)),
            ],
            1,
        );
        let index = self.data.to_device(device).view([-1]).to_kind(Kind::Int);
        let values = pairs.index_select(0, &index).view([-1]);
        let absmax = self.block_absmax(device).unsqueeze(1);
        let blocks = absmax.size()[0];
        let out = Tensor::empty([n], (kind, device));
        let whole = n / bs;
        if whole > 0 {
            let _ = values.narrow(0, 0, whole * bs).view([whole, bs]).mul_out(
                &out.narrow(0, 0, whole * bs).view([whole, bs]),
                &absmax.narrow(0, 0, whole),
            );
        }
        // A partial last block (or the padding code of an odd count).
        if whole * bs < n {
            let rest = n - whole * bs;
            let _ = values.narrow(0, whole * bs, rest).mul_out(
                &out.narrow(0, whole * bs, rest),
                &absmax.narrow(0, blocks - 1, 1).view([1]),
            );
        }
        out.view(self.shape.as_slice())
    }

    /// [`Quantized4bit::dequantize`] on the CPU in one pass over the packed
    /// bytes (the tensor version takes five, with int64 indices and a padded
    /// copy; dequantizing every layer in every forward made that the cost of
    /// a 4-bit step). The same f32 products, so the same bits.
    fn dequantize_on_host(&self) -> Tensor {
        use rayon::prelude::*;
        let table = Vec::<f32>::try_from(&self.code).expect("an f32 code book");
        let n = self.numel() as usize;
        let bs = self.blocksize as usize;
        let data = self.data.contiguous();
        let bytes: &[u8] = {
            let len = data.numel();
            // SAFETY: a contiguous u8 CPU tensor of `len` bytes, alive for this scope.
            unsafe { std::slice::from_raw_parts(data.data_ptr() as *const u8, len) }
        };
        let absmax = Vec::<f32>::try_from(
            self.block_absmax(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous(),
        )
        .expect("absmax is a float vector");
        let out = Tensor::empty([n as i64], (Kind::Float, Device::Cpu));
        // SAFETY: a fresh contiguous f32 tensor of n values, written once per index below.
        let values: &mut [f32] =
            unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n) };
        values
            .par_chunks_mut(bs)
            .zip(absmax.par_iter())
            .enumerate()
            .for_each(|(b, (block, &scale))| {
                let start = b * bs;
                for (j, v) in block.iter_mut().enumerate() {
                    let i = start + j;
                    let byte = bytes[i / 2];
                    let code = if i.is_multiple_of(2) {
                        byte >> 4
                    } else {
                        byte & 15
                    };
                    *v = table[code as usize] * scale;
                }
            });
        out.view(self.shape.as_slice())
    }

    /// The same weight with every tensor on `device`.
    pub fn to_device(&self, device: Device) -> Quantized4bit {
        Quantized4bit {
            data: self.data.to_device(device),
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            absmax: self.absmax.to_device(device),
            code: self.code.to_device(device),
            nested: self.nested.as_ref().map(|nested| NestedAbsmax {
                offset: nested.offset,
                absmax: nested.absmax.to_device(device),
                code: nested.code.to_device(device),
                blocksize: nested.blocksize,
            }),
            shape: self.shape.clone(),
            dtype: self.dtype,
        }
    }

    /// The bytes this weight holds in memory: packed codes, absmax, code
    /// book, and with double quantization the nested absmax, its code map and
    /// the offset (one f32, as bitsandbytes keeps it in a 0-d tensor).
    pub fn frozen_bytes(&self) -> usize {
        fn bytes(t: &Tensor) -> usize {
            t.numel() * t.kind().elt_size_in_bytes()
        }
        let nested = self
            .nested
            .as_ref()
            .map_or(0, |n| bytes(&n.absmax) + bytes(&n.code) + 4);
        bytes(&self.data) + bytes(&self.absmax) + bytes(&self.code) + nested
    }

    /// [`Quantized4bit::frozen_bytes`] per value of the original weight.
    pub fn bytes_per_param(&self) -> f64 {
        self.frozen_bytes() as f64 / self.numel() as f64
    }

    /// Checks that every field agrees with every other (shapes, dtypes, the
    /// code book); `what` names the weight in the error.
    pub fn check(&self, what: &str) -> Result<()> {
        let n = self.numel();
        ensure!(
            !self.shape.is_empty() && self.shape.iter().all(|&d| d > 0),
            "{what}: shape {:?} has no values",
            self.shape
        );
        ensure!(
            is_float(self.dtype),
            "{what}: dtype {:?} is not f32, f16 or bf16",
            self.dtype
        );
        if !VALID_BLOCKSIZES.contains(&self.blocksize) {
            bail!(
                "{what}: blocksize {} is not one bitsandbytes uses ({VALID_BLOCKSIZES:?})",
                self.blocksize
            );
        }
        let expect = |t: &Tensor, field: &str, kind: Kind, shape: &[i64]| -> Result<()> {
            ensure!(
                t.kind() == kind && t.size() == shape,
                "{what}: {field} is {:?} {:?}, expected {kind:?} {shape:?}",
                t.kind(),
                t.size()
            );
            Ok(())
        };
        expect(&self.data, "data", Kind::Uint8, &[(n + 1) / 2, 1])?;
        let blocks = (n + self.blocksize - 1) / self.blocksize;
        let absmax_kind = if self.nested.is_some() {
            Kind::Uint8
        } else {
            Kind::Float
        };
        expect(&self.absmax, "absmax", absmax_kind, &[blocks])?;
        // A NaN or infinite block scale turns its 64 weights into NaN/inf,
        // silently, in every forward pass.
        let finite_scales = |t: &Tensor, field: &str| -> Result<()> {
            ensure!(
                bool::try_from(t.isfinite().logical_and(&t.ge(0.0)).all())?,
                "{what}: {field} holds NaN, infinite or negative block scales; the checkpoint is broken"
            );
            Ok(())
        };
        if self.nested.is_none() {
            finite_scales(&self.absmax, "absmax")?;
        }
        expect(&self.code, "quant_map", Kind::Float, &[16])?;
        let stored: Vec<f32> = Vec::try_from(&self.code.to_device(Device::Cpu))?;
        let book = self.quant_type.code();
        // Bitwise, because bitsandbytes' kernels decode with their own table
        // whatever quant_map says: a different map would be silently ignored.
        ensure!(
            stored
                .iter()
                .zip(book)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: quant_map is not bitsandbytes' {} code book",
            self.quant_type
        );
        if let Some(nested) = &self.nested {
            ensure!(
                nested.blocksize > 0,
                "{what}: nested_blocksize {} is not positive",
                nested.blocksize
            );
            let nested_blocks = (blocks + nested.blocksize - 1) / nested.blocksize;
            expect(
                &nested.absmax,
                "nested_absmax",
                Kind::Float,
                &[nested_blocks],
            )?;
            expect(&nested.code, "nested_quant_map", Kind::Float, &[256])?;
            finite_scales(&nested.absmax, "nested_absmax")?;
            ensure!(
                nested.offset.is_finite(),
                "{what}: nested_offset {} is not finite",
                nested.offset
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host pass gives the tensor path's bytes (the path off the CPU),
    /// on the values where the two formulas can part: partial last blocks,
    /// odd counts, blocks of zeros, subnormal values and values near the
    /// code book's midpoints.
    #[test]
    fn host_codes_equal_the_tensor_path_bit_for_bit() {
        tch::manual_seed(5);
        let midpoints = QuantType::Nf4.bounds_and_order(Device::Cpu).0;
        for n in [1i64, 2, 63, 64, 65, 64 * 9 + 17, 64 * 600] {
            let w = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.02;
            if n > 128 {
                let _ = w.narrow(0, 64, 64).fill_(0.0);
                w.narrow(0, 128, 15).copy_(&(&midpoints * 0.5));
                let _ = w.narrow(0, 0, 3).fill_(1e-40);
            }
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                let a = w.to_kind(kind).to_kind(Kind::Float);
                for qt in [QuantType::Nf4, QuantType::Fp4] {
                    let (data, absmax) = codes_on_host(&a, qt).unwrap();
                    let (want_data, want_absmax) = codes_by_tensors(&a, qt);
                    let what = format!("n {n}, {kind:?}, {qt}");
                    assert!(data.equal(&want_data), "{what}: codes");
                    assert!(absmax.equal(&want_absmax), "{what}: absmax");
                }
            }
        }
    }
}
