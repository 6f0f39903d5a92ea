//! `model_type: gpt_oss` (gpt-oss-20b, gpt-oss-120b), as transformers'
//! `modeling_gpt_oss.py` computes it: a mixture of experts in every layer,
//! and beside the Llama decoder
//!
//! - attention with biases and a learned *sink* per head (`self_attn.sinks`):
//!   one more logit in each row's softmax, whose probability is dropped;
//! - sliding-window and full layers alternating (`layer_types`);
//! - YaRN RoPE (`rope_parameters` factor 32 over 4096 positions by default);
//! - RMS norms whose fp32 weight multiplies before the cast back;
//! - a router `mlp.router` with a bias that takes the top k logits and then a
//!   softmax over those k;
//! - experts stored transposed (`mlp.experts.gate_up_proj` `[experts, hidden,
//!   2·intermediate]`, gate and up interleaved column by column;
//!   `down_proj` `[experts, intermediate, hidden]`), with biases, and the
//!   clamped SwiGLU `(clamp(up, ±limit) + 1) · g·σ(α·g)`, `g = min(gate, limit)`.
//!
//! The released checkpoints store the experts in MXFP4 (4-bit blocks and
//! scales); peft-rs reads bf16/fp32 checkpoints only and refuses those by
//! name.

use anyhow::{bail, Result};
use serde_json::Value;

use super::config::{sliding_layers, ExpertStyle, LlamaConfig, MoeConfig};
use super::rope::rope_from;
use crate::config_json::RawConfig;

/// transformers' `GptOssConfig.rope_parameters` when the config has none.
fn default_rope() -> Value {
    serde_json::json!({
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": false,
        "original_max_position_embeddings": 4096,
    })
}

/// Reads a gpt-oss `config.json` (transformers' defaults where absent).
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    refuse_mxfp4(raw)?;
    let mut c = LlamaConfig::from_raw(raw)?;
    let bias = raw.opt_bool("attention_bias")?.unwrap_or(true);
    c.qkv_bias = bias;
    c.o_bias = bias;
    c.mlp_bias = false;
    c.rms_norm_eps = raw.opt_f64("rms_norm_eps")?.unwrap_or(1e-5);
    c.fp32_norms = true;
    c.attention_sinks = true;
    let stated = raw.json.get("rope_parameters").filter(|v| !v.is_null());
    let fallback = default_rope();
    let theta = raw.opt_f64("rope_theta")?.unwrap_or(150_000.0);
    let (theta, scaling) = rope_from(
        raw,
        Some(stated.unwrap_or(&fallback)),
        "rope_parameters",
        theta,
    )?;
    c.rope_theta = theta;
    c.rope_scaling = scaling;
    let n = c.num_hidden_layers;
    let window = raw.opt_usize("sliding_window")?.unwrap_or(128);
    raw.ensure(window > 0, "sliding_window", "must be positive")?;
    c.sliding_window = sliding_layers(raw, n, 2)?
        .iter()
        .map(|&s| s.then_some(window))
        .collect();
    let mut moe = MoeConfig::from_raw(raw, (128, 4), c.intermediate_size, n)?;
    let alpha = raw.opt_f64("swiglu_alpha")?.unwrap_or(1.702);
    let limit = raw.opt_f64("swiglu_limit")?.unwrap_or(7.0);
    raw.ensure(
        alpha.is_finite() && limit.is_finite() && limit > 0.0,
        "swiglu_limit",
        "swiglu_alpha and swiglu_limit must be finite, the limit positive",
    )?;
    moe.style = ExpertStyle::GptOss { alpha, limit };
    moe.router_first = true;
    moe.routing_weights_in_model_dtype = true;
    c.moe = Some(moe);
    Ok(c)
}

/// The released gpt-oss checkpoints hold their experts in MXFP4, which
/// transformers dequantizes to bf16 when it loads them; peft-rs does not.
fn refuse_mxfp4(raw: &RawConfig) -> Result<()> {
    let method = raw
        .json
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str);
    if let Some(m) = method {
        bail!(
            "{}: field `quantization_config.quant_method` is `{m}`: this gpt-oss checkpoint stores its \
             experts quantized, which peft-rs does not read; use a bf16 copy of the model (transformers \
             writes one with `Mxfp4Config(dequantize=True)` and `save_pretrained`)",
            raw.path.display()
        );
    }
    Ok(())
}
