//! peft-rs: train, load, save and merge LoRA/PEFT adapters for causal
//! language models on libtorch.
//!
//! The crate owns models, data, training and the command line; adapter
//! methods live in [`peft_adapters`] and regularizers in [`peft_regularizers`].
#![warn(missing_docs)]

pub mod cli;
pub mod data;
pub mod device;
pub mod generate;
pub mod merge;
pub mod models;
pub mod nn;
pub mod peft_model;
pub mod plot;
pub mod quant;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use peft_adapters as adapters;
pub use peft_regularizers as regularizers;
