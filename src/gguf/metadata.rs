//! The GGUF metadata of a model (`general.*` and the architecture's
//! hyperparameters, as llama.cpp's converter writes them), the RoPE
//! scalings llama.cpp takes as tensors, and what llama.cpp cannot express:
//! warned where answers change at the edges, refused where it would
//! compute another model.

use std::path::Path;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::{Arch, TensorType, Value};
use crate::models::{self, LlamaConfig};

/// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`) for `outtype`.
fn file_type(outtype: TensorType) -> u32 {
    match outtype {
        TensorType::F32 => 0,
        TensorType::F16 => 1,
        TensorType::Q8_0 => 7,
        TensorType::BF16 => 32,
    }
}

/// `general.*` metadata; `outtype` gives a model's `general.file_type`
/// (llama.cpp's converter writes none for an adapter).
pub(super) fn general(
    arch: &Arch,
    kind: &str,
    name: &str,
    outtype: Option<TensorType>,
) -> Vec<(String, Value)> {
    let mut kv = vec![
        ("general.architecture".into(), Value::Str(arch.name.into())),
        ("general.type".into(), Value::Str(kind.into())),
        ("general.name".into(), Value::Str(name.into())),
    ];
    if let Some(t) = outtype {
        kv.push(("general.file_type".into(), Value::U32(file_type(t))));
    }
    kv.push(("general.quantization_version".into(), Value::U32(2)));
    kv
}

/// The architecture's hyperparameters under `{arch}.*`; `raw` is
/// config.json, for what the converter writes only when the file has it.
pub(super) fn hparams(
    arch: &Arch,
    c: &LlamaConfig,
    raw: &serde_json::Map<String, serde_json::Value>,
) -> Vec<(String, Value)> {
    if arch.name == "phi3" {
        return phi3_hparams(c, raw);
    }
    let a = arch.name;
    let u = |k: &str, v: usize| (format!("{a}.{k}"), Value::U32(v as u32));
    let f = |k: &str, v: f64| (format!("{a}.{k}"), Value::F32(v as f32));
    let mut kv = vec![
        u("block_count", c.num_hidden_layers),
        u("context_length", c.max_position_embeddings.unwrap_or(2048)),
        u("embedding_length", c.hidden_size),
        u("feed_forward_length", c.intermediate_size),
        u("attention.head_count", c.num_attention_heads),
        u("attention.head_count_kv", c.num_key_value_heads),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(c.rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ];
    if raw.get("head_dim").is_some_and(|h| !h.is_null()) && a != "gemma3" {
        kv.push(u("attention.key_length", c.head_dim));
        kv.push(u("attention.value_length", c.head_dim));
    }
    if let Some(m) = &c.moe {
        kv.push(u("expert_count", m.num_experts));
        kv.push(u("expert_used_count", m.num_experts_per_tok));
        // llama.cpp's `llama` (Mixtral) reads the experts' width from
        // feed_forward_length.
        if a != "llama" {
            kv.push(u("expert_feed_forward_length", m.moe_intermediate_size));
        }
    }
    if a == "gpt-oss" {
        if let Some(w) = c.sliding_window.iter().flatten().min() {
            kv.push(u("attention.sliding_window", *w));
        }
    }
    if let Some((theta, _)) = &c.local_rope {
        kv.push(f("rope.freq_base_swa", *theta));
    }
    if a == "gemma3" {
        kv.extend(gemma3_hparams(c));
    }
    // llama.cpp's converter writes these for llama only (other
    // architectures take the vocabulary from the token list and the rotary
    // dimension from the head size).
    if a == "llama" {
        kv.push(u("vocab_size", c.vocab_size));
        kv.push(u("rope.dimension_count", c.rotary_dim));
    }
    let scaling_type = |t: &str| (format!("{a}.rope.scaling.type"), Value::Str(t.into()));
    match c.rope_scaling {
        models::rope::RopeScaling::Linear { factor } => {
            kv.push(scaling_type("linear"));
            kv.push(f("rope.scaling.factor", factor));
        }
        models::rope::RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            ..
        } => {
            kv.push(scaling_type("yarn"));
            kv.push(f("rope.scaling.factor", factor));
            kv.push(u(
                "rope.scaling.original_context_length",
                original_max_position_embeddings as usize,
            ));
            // The rest only where config.json sets it (llama.cpp's defaults
            // are transformers').
            let params = raw
                .get("rope_parameters")
                .or_else(|| raw.get("rope_scaling"));
            for (key, gguf) in [
                ("extrapolation_factor", "rope.scaling.yarn_ext_factor"),
                ("attention_factor", "rope.scaling.yarn_attn_factor"),
                ("beta_fast", "rope.scaling.yarn_beta_fast"),
                ("beta_slow", "rope.scaling.yarn_beta_slow"),
            ] {
                if let Some(v) = params.and_then(|p| p.get(key)).and_then(|v| v.as_f64()) {
                    kv.push(f(gguf, v));
                }
            }
        }
        _ => {}
    }
    kv
}

/// What Gemma 3 adds to the common hyperparameters: the key and value
/// length always, the final soft cap, the sliding window, and the layers'
/// pattern where it is not llama.cpp's default (five sliding layers, then
/// a full one), which the converter leaves out.
fn gemma3_hparams(c: &LlamaConfig) -> Vec<(String, Value)> {
    let mut kv = vec![
        (
            "gemma3.attention.key_length".into(),
            Value::U32(c.head_dim as u32),
        ),
        (
            "gemma3.attention.value_length".into(),
            Value::U32(c.head_dim as u32),
        ),
    ];
    if let Some(cap) = c.final_logit_softcapping.filter(|&x| x != 0.0) {
        kv.push((
            "gemma3.final_logit_softcapping".into(),
            Value::F32(cap as f32),
        ));
    }
    if let Some(w) = c.sliding_window.iter().flatten().min() {
        kv.push((
            "gemma3.attention.sliding_window".into(),
            Value::U32(*w as u32),
        ));
        let sliding: Vec<bool> = c.sliding_window.iter().map(Option::is_some).collect();
        let default: Vec<bool> = (0..sliding.len()).map(|l| l % 6 < 5).collect();
        if sliding != default {
            kv.push((
                "gemma3.attention.sliding_window_pattern".into(),
                Value::Bools(sliding),
            ));
        }
    }
    kv
}

/// Phi-3's hyperparameters, as llama.cpp's converter writes them (its own
/// list: the original context length always, the sliding window as 0 when
/// there is none, LongRoPE's attention factor computed from the lengths).
fn phi3_hparams(
    c: &LlamaConfig,
    raw: &serde_json::Map<String, serde_json::Value>,
) -> Vec<(String, Value)> {
    let u = |k: &str, v: usize| (format!("phi3.{k}"), Value::U32(v as u32));
    let f = |k: &str, v: f64| (format!("phi3.{k}"), Value::F32(v as f32));
    let context = c.max_position_embeddings.unwrap_or(2048);
    let rope = raw
        .get("rope_parameters")
        .or_else(|| raw.get("rope_scaling"));
    // The converter reads the top-level value first.
    let original = raw
        .get("original_max_position_embeddings")
        .or_else(|| rope.and_then(|r| r.get("original_max_position_embeddings")))
        .and_then(|v| v.as_u64())
        .map_or(context, |v| v as usize);
    let mut kv = vec![
        u("context_length", context),
        u("rope.scaling.original_context_length", original),
        u("embedding_length", c.hidden_size),
        u("feed_forward_length", c.intermediate_size),
        u("block_count", c.num_hidden_layers),
        u("attention.head_count", c.num_attention_heads),
        u("attention.head_count_kv", c.num_key_value_heads),
        f("attention.layer_norm_rms_epsilon", c.rms_norm_eps),
        u("rope.dimension_count", c.rotary_dim),
        f("rope.freq_base", c.rope_theta),
        u(
            "attention.sliding_window",
            c.sliding_window
                .iter()
                .flatten()
                .min()
                .copied()
                .unwrap_or(0),
        ),
    ];
    if matches!(c.rope_scaling, models::rope::RopeScaling::LongRope { .. }) {
        let scale = context as f64 / original as f64;
        let attn = if scale > 1.0 {
            (1.0 + scale.ln() / (original as f64).ln()).sqrt()
        } else {
            1.0
        };
        kv.push(f("rope.scaling.attn_factor", attn));
    }
    kv
}

/// What llama.cpp does not do that the model does, as warnings.
pub(super) fn warnings(c: &LlamaConfig, arch: &Arch, dir: &Path) -> Vec<String> {
    let mut warnings = Vec::new();
    // Gemma 3's and gpt-oss's local layers are llama.cpp's too.
    if let (Some(w), false) = (
        c.sliding_window.iter().flatten().min(),
        ["gemma3", "gpt-oss"].contains(&arch.name),
    ) {
        warnings.push(format!(
            "{}: sliding_window {w}: llama.cpp's {} attends over the whole context, so answers differ once a sequence is longer than {w} tokens",
            dir.join("config.json").display(),
            arch.name
        ));
    }
    if let models::rope::RopeScaling::LongRope {
        original_max_position_embeddings: o,
        ..
    } = c.rope_scaling
    {
        warnings.push(format!(
            "{}: LongRoPE: llama.cpp picks the long or the short factors once, by the context size it runs with (above {o}: long), transformers by each sequence's length, so short prompts run with other rotations there",
            dir.join("config.json").display()
        ));
    }
    if let models::rope::RopeScaling::Yarn {
        truncate: false, ..
    } = c.rope_scaling
    {
        warnings.push(format!(
            "{}: YaRN with `truncate` false: llama.cpp rounds the correction range to whole dimensions (truncate true), so its rotations differ slightly from transformers'",
            dir.join("config.json").display()
        ));
    }
    warnings
}

/// What llama.cpp's graphs fix that `c` sets otherwise, one line each:
/// llama.cpp would compute another model.
pub(super) fn unservable(c: &LlamaConfig, dir: &Path) -> Vec<String> {
    let config = dir.join("config.json");
    let mut out = Vec::new();
    if c.model_type.starts_with("gemma3") {
        // llama.cpp's Gemma 3 scales scores by 1/√head_dim, or by
        // 1/√(hidden / heads) for the 62-layer 27B, whatever
        // query_pre_attn_scalar says.
        let theirs = if c.num_hidden_layers == 62 {
            (c.hidden_size / c.num_attention_heads) as f64
        } else {
            c.head_dim as f64
        };
        let ours = c
            .attention_scale
            .unwrap_or(1.0 / (c.head_dim as f64).sqrt());
        if (ours as f32) != (1.0 / theirs.sqrt()) as f32 {
            out.push(format!(
                "{}: `query_pre_attn_scalar` {}: llama.cpp's gemma3 scales attention by 1/√{theirs}",
                config.display(),
                (1e6 / (ours * ours)).round() / 1e6
            ));
        }
    }
    let Some(m) = &c.moe else {
        return out;
    };
    let dense: Vec<usize> = (0..c.num_hidden_layers)
        .filter(|&l| !c.is_sparse(l))
        .collect();
    if !dense.is_empty() {
        out.push(format!(
            "{}: layers {dense:?} are dense (`mlp_only_layers` / `decoder_sparse_step`); llama.cpp's {} has experts in every layer",
            config.display(),
            c.model_type
        ));
    }
    if !m.norm_topk_prob {
        out.push(format!(
            "{}: `norm_topk_prob` is false; llama.cpp always renormalizes the top-k routing weights",
            config.display()
        ));
    }
    if let models::config::ExpertStyle::GptOss { alpha, limit } = m.style {
        // llama.cpp's constants, as f32.
        if alpha as f32 != 1.702 || limit as f32 != 7.0 {
            out.push(format!(
                "{}: `swiglu_alpha` {alpha}, `swiglu_limit` {limit}; llama.cpp's gpt-oss computes with 1.702 and 7.0",
                config.display()
            ));
        }
    }
    out
}

/// Refuses a base model the export cannot write.
pub(super) fn refuse_model(c: &LlamaConfig, dir: &Path) -> Result<()> {
    let config = dir.join("config.json");
    if let Some(first) = unservable(c, dir).into_iter().next() {
        bail!("{first}; export gguf does not write a model llama.cpp would compute differently");
    }
    if matches!(c.rope_scaling, models::rope::RopeScaling::LongRope { .. })
        && c.model_type != "phi3"
    {
        bail!(
            "{}: LongRoPE is not written by export gguf",
            config.display()
        );
    }
    if crate::quant::read_quantization(dir)?.is_some() {
        bail!(
            "{}: a bitsandbytes-quantized checkpoint; write a dequantized model with `peft-rs merge` first and export that",
            config.display()
        );
    }
    Ok(())
}

/// The RoPE scalings llama.cpp takes as tensors: Llama 3's one divisor per
/// frequency (`rope_freqs.weight`, the ratio of the unscaled to the scaled
/// frequency), LongRoPE's two lists of divisors as config.json gives them.
pub(super) fn rope_factors(c: &LlamaConfig) -> Vec<(String, Tensor)> {
    match &c.rope_scaling {
        models::rope::RopeScaling::Llama3 { .. } => {
            vec![("rope_freqs.weight".into(), llama3_rope_freqs(c))]
        }
        models::rope::RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } => {
            let list = |f: &[f64]| Tensor::from_slice(f).to_kind(Kind::Float);
            vec![
                ("rope_factors_long.weight".into(), list(long_factor)),
                ("rope_factors_short.weight".into(), list(short_factor)),
            ]
        }
        _ => Vec::new(),
    }
}

fn llama3_rope_freqs(c: &LlamaConfig) -> Tensor {
    let plain = models::rope::RotaryEmbedding::new(
        c.rotary_dim,
        c.rope_theta,
        &models::rope::RopeScaling::Default,
        Device::Cpu,
    );
    let scaled = models::rope::RotaryEmbedding::new(
        c.rotary_dim,
        c.rope_theta,
        &c.rope_scaling,
        Device::Cpu,
    );
    plain.inv_freq() / scaled.inv_freq()
}
