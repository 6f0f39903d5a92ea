//! LoRA (with rsLoRA and DoRA): configuration, layer, and PEFT's file format.

pub mod config;
pub mod files;
pub mod layer;

pub use config::{InitLoraWeights, LoraConfig, TargetModules};
pub use layer::{Combination, LoraLayer, LoraWeights};
