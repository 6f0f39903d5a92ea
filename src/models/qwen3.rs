//! Qwen3: the Qwen2 decoder without q/k/v bias (unless `attention_bias`),
//! with an RMS norm over each query and key head before RoPE (`q_norm`,
//! `k_norm`) and `head_dim` read from the config rather than
//! hidden / heads (transformers' `modeling_qwen3.py`).

use anyhow::Result;

use super::config::LlamaConfig;
use crate::config_json::RawConfig;

/// Reads a `model_type: qwen3` config.
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    // Sliding windows per layer follow the same rules as Qwen2's
    // (`use_sliding_window`, `max_window_layers`, `layer_types`).
    let mut c = super::qwen2::config(raw)?;
    let bias = raw.opt_bool("attention_bias")?.unwrap_or(false);
    c.qkv_bias = bias;
    c.o_bias = bias;
    c.mlp_bias = false;
    c.qk_norm = true;
    Ok(c)
}
