//! Qwen3-MoE: the Qwen3 decoder (q/k norms, `head_dim` from the config)
//! whose MLPs are mixtures of experts — a top-k router (`mlp.gate`) over
//! `num_experts` SwiGLU experts stored as 3D parameters (`mlp.experts.
//! gate_up_proj`, `mlp.experts.down_proj`) — except the layers
//! `mlp_only_layers` and `decoder_sparse_step` keep dense
//! (transformers' `modeling_qwen3_moe.py`).

use anyhow::Result;

use super::config::{LlamaConfig, MoeConfig};
use crate::config_json::RawConfig;

/// Reads a `model_type: qwen3_moe` config.
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    let mut c = LlamaConfig::from_raw(raw)?;
    let bias = raw.opt_bool("attention_bias")?.unwrap_or(false);
    c.qkv_bias = bias;
    c.o_bias = bias;
    c.mlp_bias = false;
    c.qk_norm = true;
    // Unlike Qwen2/Qwen3, one window for every layer when it is on.
    if raw.opt_bool("use_sliding_window")?.unwrap_or(false) {
        c.set_sliding_window(raw)?;
    }
    let layers = c.num_hidden_layers;
    let experts = raw.opt_usize("num_experts")?;
    if experts.or(raw.opt_usize("num_local_experts")?) == Some(0) {
        return Ok(c); // transformers builds every MLP dense then
    }
    let width = raw.opt_usize("moe_intermediate_size")?.unwrap_or(768);
    // transformers' defaults: 128 experts, top 8.
    let mut moe = MoeConfig::from_raw(raw, (128, 8), width, layers)?;
    moe.norm_topk_prob = raw.opt_bool("norm_topk_prob")?.unwrap_or(false);
    let step = raw.opt_usize("decoder_sparse_step")?.unwrap_or(1);
    raw.ensure(step > 0, "decoder_sparse_step", "must be positive")?;
    let dense = raw.token_ids("mlp_only_layers")?;
    moe.sparse_layers = (0..layers)
        .map(|i| !dense.contains(&(i as i64)) && (i + 1) % step == 0)
        .collect();
    c.moe = Some(moe);
    Ok(c)
}
