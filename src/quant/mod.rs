//! The frozen base of QLoRA: bitsandbytes' 4-bit (NF4, FP4) and 8-bit
//! (LLM.int8) weight quantization, reproduced byte for byte.
//!
//! What is stored is exactly what bitsandbytes stores — the packed codes, the
//! per-block absmax (itself quantized with double quantization), the code
//! maps — so that a checkpoint saved by transformers loads into these types
//! and a weight quantized here is the one bitsandbytes would have produced.
//! The reference is bitsandbytes' CPU path (0.50.x); where its CUDA kernels
//! round differently the module documentation of [`four_bit`] and [`int8`]
//! says so.
//!
//! Quantization is computed with tensor operations (lookups with
//! `index_select`, `bucketize` against the code-book midpoints) on whatever
//! device the input lives on; 4-bit weights in host memory are decoded by one
//! parallel loop over their bytes, elsewhere by tensor operations (the same
//! bits either way).
//!
//! - [`quantize_4bit`] / [`Quantized4bit::dequantize`]: blocks of 64 values, one
//!   absmax per block, two 4-bit codes per byte; with `double_quant` the absmax
//!   values are quantized again (8-bit dynamic map, blocks of 256, an offset).
//! - [`quantize_int8`] / [`Int8Weight::dequantize`]: row-wise absmax to int8, as
//!   transformers' `load_in_8bit` stores it (`weight` int8 and `SCB` fp32).
//! - [`checkpoint`]: pre-quantized transformers checkpoints; [`config`]:
//!   config.json's `quantization_config`.
//! - [`load`]: quantizing a model's linear layers while it loads (`--quantize`).
//! - [`frozen`]: a linear layer's frozen weight, dense or quantized.

pub mod checkpoint;
pub mod codebook;
pub mod config;
pub mod four_bit;
pub mod frozen;
pub mod int8;
pub mod load;
pub mod matmul_4bit;

pub use checkpoint::{load_4bit, load_int8};
pub use codebook::{dynamic_map, QuantType};
pub use config::{read_quantization, BnbMode, BnbQuantization};
pub use four_bit::{
    dequantize_blockwise, quantize_4bit, quantize_blockwise, NestedAbsmax, Quantized4bit,
    BLOCKSIZE, NESTED_BLOCKSIZE,
};
pub use frozen::FrozenWeight;
pub use int8::{quantize_int8, Int8Weight};
pub use load::{QuantPlan, Quantize};
