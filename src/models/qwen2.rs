//! Qwen2: the Llama decoder with bias on the q/k/v projections and optional
//! sliding-window attention on some layers (transformers' `modeling_qwen2.py`).

use anyhow::Result;
use serde_json::Value;

use super::config::LlamaConfig;
use crate::config_json::RawConfig;

/// Reads a `model_type: qwen2` config.
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    let mut c = LlamaConfig::from_raw(raw)?;
    c.qkv_bias = true;
    c.o_bias = false;
    c.mlp_bias = false;
    let window = if raw.opt_bool("use_sliding_window")?.unwrap_or(false) {
        raw.opt_usize("sliding_window")?
    } else {
        None
    };
    let max_window_layers = raw.opt_usize("max_window_layers")?.unwrap_or(28); // transformers' default
    let layer_types: Option<Vec<&str>> = match raw.json.get("layer_types") {
        Some(Value::Array(a)) => Some(a.iter().filter_map(Value::as_str).collect()),
        _ => None,
    };
    if let Some(types) = &layer_types {
        raw.ensure(
            types.len() == c.num_hidden_layers,
            "layer_types",
            "must list one type per layer",
        )?;
    }
    c.sliding_window = (0..c.num_hidden_layers)
        .map(|i| {
            let sliding = match &layer_types {
                Some(types) => types[i] == "sliding_attention",
                None => i >= max_window_layers,
            };
            if sliding {
                window
            } else {
                None
            }
        })
        .collect();
    Ok(c)
}
