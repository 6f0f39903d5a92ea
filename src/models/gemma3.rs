//! Gemma 3 text models: the Llama decoder with the embeddings scaled by
//! √hidden, RMS norms applied as `(1 + w)` in fp32, four norms per layer
//! (the attention and MLP outputs are normed before each residual add),
//! q/k norms per head, attention scaled by `query_pre_attn_scalar^-0.5`, a
//! GELU-tanh MLP, sliding-window layers with their own RoPE base alternating
//! with global layers, tied embeddings, and optional final logit
//! soft-capping (transformers' `modeling_gemma3.py`, `Gemma3ForCausalLM`).

use anyhow::{bail, Result};
use serde_json::Value;

use super::config::RawConfig;
use super::llama::{rope_from, Activation, LlamaConfig, RopeScaling};

/// Reads a `model_type: gemma3_text` config.
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    let mut c = LlamaConfig::from_raw(raw)?;
    let act = raw
        .opt_str("hidden_activation")?
        .or(raw.opt_str("hidden_act")?)
        .unwrap_or("gelu_pytorch_tanh");
    raw.ensure(
        act == "gelu_pytorch_tanh",
        "hidden_activation",
        &format!("`{act}` is not supported; Gemma 3 uses `gelu_pytorch_tanh`"),
    )?;
    c.hidden_act = Activation::GeluTanh;
    let bias = raw.opt_bool("attention_bias")?.unwrap_or(false);
    c.qkv_bias = bias;
    c.o_bias = bias;
    c.mlp_bias = false;
    c.qk_norm = true;
    c.gemma_norms = true;
    c.sandwich_norms = true;
    c.tie_word_embeddings = raw.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    c.embed_scale = Some((c.hidden_size as f64).powf(0.5));
    let scalar = raw.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
    raw.ensure(
        scalar.is_finite() && scalar > 0.0,
        "query_pre_attn_scalar",
        "must be a positive number",
    )?;
    c.attention_scale = Some(scalar.powf(-0.5));
    c.final_logit_softcapping = raw.opt_f64("final_logit_softcapping")?;
    if let Some(cap) = raw.opt_f64("attn_logit_softcapping")? {
        bail!(
            "{}: field `attn_logit_softcapping` is {cap}; attention logit soft-capping (Gemma 2) is not implemented",
            raw.path.display()
        );
    }
    if raw.opt_bool("use_bidirectional_attention")? == Some(true) {
        bail!(
            "{}: field `use_bidirectional_attention` is true; only causal attention is implemented",
            raw.path.display()
        );
    }

    // Which layers slide: `layer_types`, else every `sliding_window_pattern`-th is global.
    let n = c.num_hidden_layers;
    let sliding: Vec<bool> = match raw.json.get("layer_types") {
        Some(Value::Array(a)) => {
            raw.ensure(a.len() == n, "layer_types", "must list one type per layer")?;
            a.iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => bail!(
                        "{}: field `layer_types` holds {t}; supported: sliding_attention, full_attention",
                        raw.path.display()
                    ),
                })
                .collect::<Result<_>>()?
        }
        _ => {
            let pattern = raw
                .opt_usize("sliding_window_pattern")?
                .or(raw.opt_usize("_sliding_window_pattern")?)
                .unwrap_or(6);
            raw.ensure(pattern > 0, "sliding_window_pattern", "must be positive")?;
            (0..n).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    let window = raw.opt_usize("sliding_window")?.unwrap_or(4096);
    raw.ensure(window > 0, "sliding_window", "must be positive")?;
    c.sliding_window = sliding.iter().map(|&s| s.then_some(window)).collect();

    // RoPE: per layer type in transformers 5's `rope_parameters`, else
    // `rope_theta`/`rope_scaling` for global layers and
    // `rope_local_base_freq` for sliding ones.
    let params = raw.json.get("rope_parameters").filter(|v| !v.is_null());
    let (global, local) = match params.filter(|p| p.get("full_attention").is_some()) {
        Some(p) => (
            rope_from(
                raw,
                p.get("full_attention").filter(|v| !v.is_null()),
                "rope_parameters.full_attention",
                raw.opt_f64("rope_theta")?.unwrap_or(1_000_000.0),
            )?,
            rope_from(
                raw,
                p.get("sliding_attention").filter(|v| !v.is_null()),
                "rope_parameters.sliding_attention",
                raw.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0),
            )?,
        ),
        None => (
            (c.rope_theta, c.rope_scaling.clone()),
            (
                raw.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0),
                RopeScaling::Default,
            ),
        ),
    };
    for (field, theta) in [("rope_theta", global.0), ("rope_local_base_freq", local.0)] {
        raw.ensure(
            theta.is_finite() && theta > 1.0,
            field,
            &format!("{theta} must be a finite number above 1"),
        )?;
    }
    (c.rope_theta, c.rope_scaling) = global;
    c.local_rope = Some(local);
    Ok(c)
}

/// A `model_type: gemma3` (multimodal) checkpoint: its text tower lives under
/// `model.language_model`, which peft-rs does not read yet; refused by name.
pub fn refuse_multimodal(raw: &RawConfig) -> Result<LlamaConfig> {
    bail!(
        "{}: `model_type` is `gemma3`, a multimodal checkpoint (vision tower and text tower under \
         `model.language_model`); peft-rs reads Gemma 3 text models (`gemma3_text`, e.g. \
         gemma-3-1b-it) only",
        raw.path.display()
    )
}
