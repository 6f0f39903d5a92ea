//! LoKr (Yeh et al. 2023, "Navigating Text-To-Image Customization";
//! LyCORIS): the weight update as a Kronecker product,
//! ΔW = scaling · W1 ⊗ W2, each factor whole or a low-rank product — PEFT's
//! `LoKrConfig` and `LoKrLayer`.

pub mod config;
pub mod layer;

pub use config::{factorization, InitWeights, Layout, LokrConfig};
pub use layer::{Factor, LokrLayer, LokrWeights};
