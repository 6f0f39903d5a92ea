//! VeRA (Kopiczko et al. 2024, "Vector-based Random Matrix Adaptation"):
//! one pair of frozen random projections A, B shared by every adapted
//! layer, and per layer two trainable vectors that scale them,
//! ΔW = diag(λ_b) B diag(λ_d) A — PEFT's `VeraConfig` and `VeraLayer`.

pub mod config;
pub mod layer;

pub use config::VeraConfig;
pub use layer::{VeraLayer, VeraWeights};
