//! peft-rs: train, load, save and merge LoRA/PEFT adapters for causal
//! language models on libtorch.
//!
//! The crate owns models, data, training and the command line; adapter
//! methods live in [`peft_adapters`] and regularizers in [`peft_regularizers`].
#![warn(missing_docs)]

pub mod answers;
pub mod cli;
pub mod config_json;
pub mod cpu;
pub mod cuda_library;
pub mod data;
pub mod device;
pub mod dist;
pub mod flash_attention;
pub mod fused_norm;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod mapped_tensor;
pub mod memory;
pub mod merge;
pub mod models;
pub mod nn;
pub mod outputs;
pub mod peft_model;
pub mod plot;
pub mod progress;
pub mod quant;
pub mod signals;
pub mod tokenizer;
pub mod train;
pub mod unread_linear;
pub mod weights;

pub use peft_adapters as adapters;
pub use peft_regularizers as regularizers;

/// jemalloc, to be the allocator of a program using peft-rs (the `peft-rs`
/// binary and the benchmark examples declare it with `#[global_allocator]`).
/// It replaces `malloc` for the whole process, libtorch's tensors included. A
/// training step frees and reallocates gigabytes of activations; glibc hands
/// them back to the kernel and faults them in again (a fifth of a CPU step
/// went to zeroing pages) and fragments the heap. On the training-step
/// benchmark it gave 20% less CPU time and 27% less peak memory.
pub use tikv_jemallocator::Jemalloc;
