//! IA³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better
//! and Cheaper than In-Context Learning"): one learned vector per adapted
//! layer that rescales its output, or, on feed-forward layers, its input —
//! PEFT's `IA3Config` and `IA3Layer`.

pub mod config;
pub mod layer;

pub use config::Ia3Config;
pub use layer::Ia3Layer;
