//! Mixtral: the Mistral decoder whose every MLP is a mixture of
//! `num_local_experts` SwiGLU experts, each token sent to the top
//! `num_experts_per_tok` with renormalized weights (transformers'
//! `modeling_mixtral.py`). Hub checkpoints store the experts as
//! `block_sparse_moe.experts.N.w1/w3/w2` (gate, up, down) and the router as
//! `block_sparse_moe.gate`; transformers 5 names them `mlp.*`.

use anyhow::Result;

use super::config::{LlamaConfig, MoeConfig};
use crate::config_json::RawConfig;

/// Reads a `model_type: mixtral` config.
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    let mut c = super::mistral::config(raw)?;
    // transformers' defaults: 8 experts, top 2.
    let mut moe = MoeConfig::from_raw(raw, (8, 2), c.intermediate_size, c.num_hidden_layers)?;
    moe.per_expert_names = ("block_sparse_moe", "w1", "w3", "w2");
    moe.routing_weights_in_model_dtype = false;
    moe.router_first = true;
    let jitter = raw.opt_f64("router_jitter_noise")?.unwrap_or(0.0);
    raw.ensure(
        jitter == 0.0,
        "router_jitter_noise",
        &format!("{jitter}: peft-rs does not jitter the router's input in training; set it to 0.0 (as the released Mixtral checkpoints have it)"),
    )?;
    c.moe = Some(moe);
    Ok(c)
}
