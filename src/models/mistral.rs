//! Mistral: the Llama decoder with sliding-window attention
//! (transformers' `modeling_mistral.py`).

use anyhow::Result;

use super::config::LlamaConfig;
use crate::config_json::RawConfig;

/// Reads a `model_type: mistral` config.
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    let mut c = LlamaConfig::from_raw(raw)?;
    // Mistral has no attention or MLP bias, whatever the file says.
    c.qkv_bias = false;
    c.o_bias = false;
    c.mlp_bias = false;
    c.set_sliding_window(raw)?;
    Ok(c)
}
