//! Gemma 3 text models: the Llama decoder with the embeddings scaled by
//! √hidden, RMS norms applied as `(1 + w)` in fp32, four norms per layer
//! (the attention and MLP outputs are normed before each residual add),
//! q/k norms per head, attention scaled by `query_pre_attn_scalar^-0.5`, a
//! GELU-tanh MLP, sliding-window layers with their own RoPE base alternating
//! with global layers, tied embeddings, and optional final logit
//! soft-capping (transformers' `modeling_gemma3.py`, `Gemma3ForCausalLM`);
//! and the text tower of the multimodal checkpoints (`model_type: gemma3`).

use anyhow::{bail, Result};
use serde_json::Value;

use super::config::{sliding_layers, LlamaConfig};
use super::mlp::Activation;
use super::rope::{rope_from, RopeScaling};
use crate::config_json::RawConfig;

/// The values transformers' `Gemma3TextConfig` gives the fields a config
/// leaves out (the `text_config` of the released multimodal checkpoints
/// lists only the fields that differ from them). `rope_theta` is the global
/// layers' base when no `rope_parameters` are given.
const TEXT_DEFAULTS: &[(&str, f64)] = &[
    ("vocab_size", 262_208.0),
    ("hidden_size", 2304.0),
    ("intermediate_size", 9216.0),
    ("num_hidden_layers", 26.0),
    ("num_attention_heads", 8.0),
    ("num_key_value_heads", 4.0),
    ("head_dim", 256.0),
    ("max_position_embeddings", 131_072.0),
    ("rms_norm_eps", 1e-6),
    ("query_pre_attn_scalar", 256.0),
    ("sliding_window", 4096.0),
];

/// `raw` with [`TEXT_DEFAULTS`] filled in where a field is absent.
fn with_defaults(raw: &RawConfig) -> RawConfig {
    let mut json = raw.json.clone();
    for &(k, v) in TEXT_DEFAULTS {
        if !json.contains_key(k) {
            let value = if v.fract() == 0.0 {
                Value::from(v as u64)
            } else {
                Value::from(v)
            };
            json.insert(k.to_owned(), value);
        }
    }
    if !json.contains_key("rope_theta") && !json.contains_key("rope_parameters") {
        json.insert("rope_theta".to_owned(), Value::from(1_000_000.0));
    }
    RawConfig {
        path: raw.path.clone(),
        json,
    }
}

/// Reads a `model_type: gemma3_text` config. (Long on purpose: Gemma 3's
/// differences from the shared configuration, one after another, as
/// transformers' `Gemma3TextConfig` reads them.)
pub fn config(raw: &RawConfig) -> Result<LlamaConfig> {
    let raw = &with_defaults(raw);
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
    let sliding = sliding_layers(raw, n, 6)?;
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

/// A `model_type: gemma3` checkpoint (`Gemma3ForConditionalGeneration`):
/// the text model from `text_config`, its module paths under
/// `model.language_model` as transformers and PEFT name them. The vision
/// tower and the multimodal projector are not read (a note says so when the
/// model loads); inputs are text only, as for `Gemma3ForConditionalGeneration`
/// without `pixel_values`. Its head applies no final logit soft-capping,
/// whatever `text_config` says: only `Gemma3ForCausalLM` does.
pub fn multimodal_config(raw: &RawConfig) -> Result<LlamaConfig> {
    let mut text = match raw.json.get("text_config") {
        Some(Value::Object(t)) => t.clone(),
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(other) => bail!(
            "{}: field `text_config` must be an object, found {other}",
            raw.path.display()
        ),
    };
    text.entry("model_type")
        .or_insert_with(|| Value::from("gemma3_text"));
    let text = RawConfig {
        path: std::path::PathBuf::from(format!("{} (text_config)", raw.path.display())),
        json: text,
    };
    if let Some(t) = text.opt_str("model_type")? {
        text.ensure(
            t == "gemma3_text",
            "model_type",
            &format!("is `{t}`; a Gemma 3 checkpoint's text model is `gemma3_text`"),
        )?;
    }
    let mut c = config(&text)?;
    c.model_type = "gemma3".to_owned();
    c.final_logit_softcapping = None;
    c.tie_word_embeddings = raw.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    let eos = raw.token_ids("eos_token_id")?;
    if !eos.is_empty() {
        c.eos_token_ids = eos;
    }
    if let Some(d) = raw.opt_str("dtype")?.or(raw.opt_str("torch_dtype")?) {
        c.saved_dtype = Some(d.to_owned());
    }
    c.decoder_path = "model.language_model".to_owned();
    c.stored_decoder = c.decoder_path.clone();
    c.skipped_towers = [
        "vision_tower",
        "multi_modal_projector",
        "model.vision_tower",
        "model.multi_modal_projector",
    ]
    .map(str::to_owned)
    .to_vec();
    Ok(c)
}
