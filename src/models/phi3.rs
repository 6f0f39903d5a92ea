//! Phi-3 (and Phi-4-mini): the Llama decoder with fused projections —
//! `self_attn.qkv_proj` (queries, keys and values stacked) and
//! `mlp.gate_up_proj` (gate, then up) — RoPE on the leading
//! `partial_rotary_factor` of each head, and one sliding window for every
//! layer where `sliding_window` is set, and LongRoPE (`rope_type` `longrope`,
//! earlier `su`/`yarn`) as the 128k Phi-3, Phi-3.5 and Phi-4-mini use it
//! (transformers' `modeling_phi3.py`; see [`super::rope::RopeScaling::LongRope`]).
//! PEFT targets the fused modules by their own names.

use anyhow::{bail, Result};

use super::config::LlamaConfig;
use super::rope::RopeScaling;
use crate::config_json::RawConfig;

/// Reads a `model_type: phi3` config.
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    let mut c = LlamaConfig::from_raw(raw)?;
    c.qkv_bias = false;
    c.o_bias = false;
    c.mlp_bias = false;
    c.fused_projections = true;
    for field in ["resid_pdrop", "embd_pdrop"] {
        if let Some(p) = raw.opt_f64(field)? {
            if p != 0.0 {
                bail!(
                    "{}: field `{field}` is {p}; Phi-3's residual/embedding dropout in training is not implemented (set it to 0.0)",
                    raw.path.display()
                );
            }
        }
    }
    let factor = raw
        .number_in(
            raw.json.get("rope_parameters"),
            "rope_parameters",
            "partial_rotary_factor",
        )?
        .or(raw.opt_f64("partial_rotary_factor")?)
        .unwrap_or(1.0);
    raw.ensure(
        factor > 0.0 && factor <= 1.0,
        "partial_rotary_factor",
        &format!("{factor} must be in (0, 1]"),
    )?;
    // As transformers: int(head_dim * factor).
    let rotary_dim = (c.head_dim as f64 * factor) as usize;
    raw.ensure(
        rotary_dim >= 2 && rotary_dim.is_multiple_of(2),
        "partial_rotary_factor",
        &format!("gives {rotary_dim} rotary dimensions; must be even and positive"),
    )?;
    c.rotary_dim = rotary_dim;
    if let RopeScaling::LongRope {
        short_factor,
        long_factor,
        ..
    } = &c.rope_scaling
    {
        for (name, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
            raw.ensure(
                f.len() == rotary_dim / 2,
                &format!("rope_parameters.{name}"),
                &format!(
                    "has {} values; LongRoPE needs one per rotary frequency ({})",
                    f.len(),
                    rotary_dim / 2
                ),
            )?;
        }
    }
    c.set_sliding_window(raw)?;
    Ok(c)
}
