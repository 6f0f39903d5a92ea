//! LoHa (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS): the weight update as
//! the Hadamard product of two low-rank products,
//! ΔW = scaling · (W1a W1b) ⊙ (W2a W2b) — PEFT's `LoHaConfig` and `LoHaLayer`.

pub mod config;
pub mod layer;

pub use config::LohaConfig;
pub use layer::{LohaLayer, LohaWeights};
