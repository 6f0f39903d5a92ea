//! LoRA (with rsLoRA and DoRA): configuration, layer, and PEFT's file format.

pub mod config;
pub mod dropout_a;
pub mod files;
pub mod init;
pub mod layer;
pub mod param;
pub mod targets;

pub use config::{InitLoraWeights, LoraConfig};
pub use layer::{Combination, LoraLayer, LoraWeights};
pub use targets::TargetModules;
