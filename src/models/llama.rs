//! Llama (1, 2, 3, 3.2; SmolLM2): the decoder as the shared configuration
//! describes it, with nothing of its own. Mistral, Qwen2, Qwen3, Gemma 3 and
//! Phi-3 are the same decoder with the differences their files state.

use anyhow::Result;

use super::config::LlamaConfig;
use crate::config_json::RawConfig;

/// The configuration of a `model_type: llama` checkpoint.
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    LlamaConfig::from_raw(raw)
}
