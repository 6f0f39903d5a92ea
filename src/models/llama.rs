//! The Llama decoder, as transformers' `modeling_llama.py` computes it.
//!
//! Struct and field names mirror the Hugging Face module paths
//! (`model.layers.N.self_attn.q_proj`, `model.norm`, `lm_head`), so loading is
//! a walk over names and the file reads next to transformers' code. Mistral
//! (sliding-window attention), Qwen2 (q/k/v bias) and Qwen3 (q/k norms) are this decoder with a
//! different configuration; see `mistral.rs` and `qwen2.rs`.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::config::RawConfig;
use super::loader::Weights;
use crate::nn::{forward_same_input, FrozenWeight, Linear, RmsNorm};
use peft_regularizers::rng::with_torch_seed;

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq = 1 / theta^(2i/d)`.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Overall scaling factor.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
    },
    /// LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): per-frequency divisors,
    /// `short_factor` while a forward pass's sequence length (the largest
    /// position + 1) is at most `original_max_position_embeddings`,
    /// `long_factor` beyond it; cos and sin are multiplied by `attention_factor`.
    LongRope {
        /// Divisors of the frequencies for sequences up to the original length.
        short_factor: Vec<f64>,
        /// Divisors of the frequencies for longer sequences.
        long_factor: Vec<f64>,
        /// The length above which `long_factor` applies.
        original_max_position_embeddings: i64,
        /// What cos and sin are multiplied by.
        attention_factor: f64,
    },
}

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `silu` (Llama, Mistral, Qwen).
    Silu,
    /// `gelu_pytorch_tanh` (Gemma).
    GeluTanh,
}

/// Everything the decoder needs from `config.json`.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// `model_type` as read.
    pub model_type: String,
    /// Rows of `embed_tokens`.
    pub vocab_size: usize,
    /// `d`, the width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Bias on gate/up/down projections.
    pub mlp_bias: bool,
    /// Sliding attention window per layer (`None`: full causal attention).
    pub sliding_window: Vec<Option<usize>>,
    /// RMS norms over each query and key head (`self_attn.q_norm`,
    /// `self_attn.k_norm`) before RoPE, as Qwen3 and Gemma 3 have.
    pub qk_norm: bool,
    /// The MLP's activation (`hidden_act` / `hidden_activation`).
    pub hidden_act: Activation,
    /// Gemma's RMS norms: weight stored as `w` and applied as `(1 + w)`, in fp32.
    pub gemma_norms: bool,
    /// Gemma 3's four norms per layer: the attention and MLP outputs are
    /// normed before the residual add (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`), the MLP input by `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Embeddings multiplied by this (cast to the model dtype first), as
    /// Gemma's scaled word embedding does with √hidden.
    pub embed_scale: Option<f64>,
    /// Attention scores are scaled by this; `None`: 1/√head_dim.
    pub attention_scale: Option<f64>,
    /// `final_logit_softcapping`: logits become `cap · tanh(logits / cap)`.
    pub final_logit_softcapping: Option<f64>,
    /// RoPE of the sliding-window layers when it differs from the global
    /// one (Gemma 3's `rope_local_base_freq`).
    pub local_rope: Option<(f64, RopeScaling)>,
    /// Phi-3's fused projections: `self_attn.qkv_proj` (queries, keys,
    /// values stacked) and `mlp.gate_up_proj` (gate, then up).
    pub fused_projections: bool,
    /// The leading dimensions of each head that RoPE rotates (Phi-3's
    /// `partial_rotary_factor`); the rest pass through.
    pub rotary_dim: usize,
    /// The decoder's module path: `model`, or `model.language_model` for
    /// the text tower of a multimodal checkpoint (Gemma 3). Adapters and
    /// [`LlamaConfig::linear_modules`] name modules under it, as PEFT does.
    pub decoder_path: String,
    /// Where the decoder's tensors are stored in the checkpoint files, when
    /// not under `decoder_path` (`language_model.model` in Gemma 3
    /// checkpoints as transformers saves them), and where `lm_head` is;
    /// see [`LlamaConfig::with_stored_names`].
    pub stored_decoder: String,
    /// The stored name of `lm_head`.
    pub stored_head: String,
    /// Tensor name prefixes of towers the checkpoint holds and peft-rs
    /// deliberately does not read (a multimodal model's vision tower).
    pub skipped_towers: Vec<String>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<i64>,
    /// The dtype the checkpoint was saved in (`dtype`/`torch_dtype`), if stated.
    pub saved_dtype: Option<String>,
    /// `max_position_embeddings`: the positions the model was trained for
    /// (generation stops there), if stated.
    pub max_position_embeddings: Option<usize>,
}

impl LlamaConfig {
    /// Reads the fields every Llama-family config shares.
    pub fn from_raw(raw: &RawConfig) -> Result<Self> {
        let hidden_size = raw.usize("hidden_size")?;
        let num_attention_heads = raw.usize("num_attention_heads")?;
        raw.ensure(
            num_attention_heads > 0,
            "num_attention_heads",
            "must be positive",
        )?;
        let num_key_value_heads = raw
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        raw.ensure(
            num_key_value_heads > 0 && num_attention_heads % num_key_value_heads == 0,
            "num_key_value_heads",
            "must divide num_attention_heads",
        )?;
        let head_dim = raw
            .opt_usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);
        raw.ensure(
            head_dim % 2 == 0 && head_dim > 0,
            "head_dim",
            "must be even and positive",
        )?;
        if let Some(act) = raw.opt_str("hidden_act")? {
            raw.ensure(act == "silu", "hidden_act", "only `silu` is supported")?;
        }
        let (rope_theta, rope_scaling) = rope(raw)?;
        let attention_bias = raw.opt_bool("attention_bias")?.unwrap_or(false);
        let num_hidden_layers = raw.usize("num_hidden_layers")?;
        let vocab_size = raw.usize("vocab_size")?;
        let intermediate_size = raw.usize("intermediate_size")?;
        // Sizes are checked before anything is allocated from them; the
        // weights are then checked against the config tensor by tensor.
        for (field, value, max) in [
            ("num_hidden_layers", num_hidden_layers, 1 << 12),
            ("hidden_size", hidden_size, 1 << 20),
            ("intermediate_size", intermediate_size, 1 << 22),
            ("vocab_size", vocab_size, 1 << 24),
            ("num_attention_heads", num_attention_heads, 1 << 12),
            ("head_dim", head_dim, 1 << 14),
        ] {
            raw.ensure(
                value > 0 && value <= max,
                field,
                &format!("{value} is outside 1..={max}"),
            )?;
        }
        let rms_norm_eps = raw.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        raw.ensure(
            rms_norm_eps > 0.0 && rms_norm_eps < 1.0,
            "rms_norm_eps",
            &format!("{rms_norm_eps} must be a small positive number"),
        )?;
        raw.ensure(
            rope_theta.is_finite() && rope_theta > 1.0,
            "rope_theta",
            &format!("{rope_theta} must be a finite number above 1"),
        )?;
        Ok(Self {
            model_type: raw.model_type()?.to_owned(),
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: attention_bias,
            o_bias: attention_bias,
            mlp_bias: raw.opt_bool("mlp_bias")?.unwrap_or(false),
            sliding_window: vec![None; num_hidden_layers],
            qk_norm: false,
            hidden_act: Activation::Silu,
            gemma_norms: false,
            sandwich_norms: false,
            embed_scale: None,
            attention_scale: None,
            final_logit_softcapping: None,
            local_rope: None,
            fused_projections: false,
            rotary_dim: head_dim,
            decoder_path: "model".to_owned(),
            stored_decoder: "model".to_owned(),
            stored_head: OUTPUT_HEAD.to_owned(),
            skipped_towers: Vec::new(),
            eos_token_ids: raw.token_ids("eos_token_id")?,
            saved_dtype: raw
                .opt_str("dtype")?
                .or(raw.opt_str("torch_dtype")?)
                .map(str::to_owned),
            max_position_embeddings: raw.opt_usize("max_position_embeddings")?,
        })
    }
}

impl LlamaConfig {
    /// The linear modules of one decoder layer as (path under
    /// `model.layers.N`, in_features, out_features, bias): the one place
    /// their shapes are written. `layer_linears!` is the one place their
    /// fields are; loading checks that the two agree.
    pub fn layer_linear_shapes(&self) -> Vec<(&'static str, i64, i64, bool)> {
        let (h, hd) = (self.hidden_size as i64, self.head_dim as i64);
        let (q, kv) = (
            self.num_attention_heads as i64 * hd,
            self.num_key_value_heads as i64 * hd,
        );
        let inter = self.intermediate_size as i64;
        let (qkv, o, mlp) = (self.qkv_bias, self.o_bias, self.mlp_bias);
        if self.fused_projections {
            return vec![
                ("self_attn.qkv_proj", h, q + 2 * kv, qkv),
                ("self_attn.o_proj", q, h, o),
                ("mlp.gate_up_proj", h, 2 * inter, mlp),
                ("mlp.down_proj", inter, h, mlp),
            ];
        }
        vec![
            ("self_attn.q_proj", h, q, qkv),
            ("self_attn.k_proj", h, kv, qkv),
            ("self_attn.v_proj", h, kv, qkv),
            ("self_attn.o_proj", q, h, o),
            ("mlp.gate_proj", h, inter, mlp),
            ("mlp.up_proj", h, inter, mlp),
            ("mlp.down_proj", inter, h, mlp),
        ]
    }

    /// Every linear module as (Hugging Face path, in_features, out_features),
    /// in the order of [`LlamaForCausalLM::linear_layers`]; lets tools such
    /// as `merge` plan without loading the model.
    pub fn linear_modules(&self) -> Vec<(String, i64, i64)> {
        let mut v = Vec::new();
        for i in 0..self.num_hidden_layers {
            for (name, i_, o, _) in self.layer_linear_shapes() {
                v.push((format!("{}.layers.{i}.{name}", self.decoder_path), i_, o));
            }
        }
        v.push((
            OUTPUT_HEAD.to_owned(),
            self.hidden_size as i64,
            self.vocab_size as i64,
        ));
        v
    }
}

impl LlamaConfig {
    /// Where this checkpoint stores the decoder of a multimodal model: under
    /// its module path (`model.language_model.*`), or as transformers saves
    /// Gemma 3 (`language_model.model.*`, with `language_model.lm_head`
    /// when the head is not tied), as `has` (a tensor name test) shows.
    pub fn with_stored_names(mut self, has: impl Fn(&str) -> bool) -> Self {
        let legacy = "language_model.model";
        if self.decoder_path != "model"
            && !has(&format!("{}.embed_tokens.weight", self.decoder_path))
            && has(&format!("{legacy}.embed_tokens.weight"))
        {
            self.stored_decoder = legacy.to_owned();
            if has("language_model.lm_head.weight") {
                self.stored_head = "language_model.lm_head".to_owned();
            }
        }
        self
    }

    /// The stored tensor name of the tensor `name` (a module path plus `.weight` etc.).
    pub fn stored_name(&self, name: &str) -> String {
        if let Some(rest) = name.strip_prefix(&format!("{}.", self.decoder_path)) {
            return format!("{}.{rest}", self.stored_decoder);
        }
        match name.strip_prefix(OUTPUT_HEAD) {
            Some(rest) if rest.is_empty() || rest.starts_with('.') => {
                format!("{}{rest}", self.stored_head)
            }
            _ => name.to_owned(),
        }
    }

    /// The module-path name of the stored tensor `name` (the inverse of
    /// [`LlamaConfig::stored_name`]).
    pub fn module_name(&self, name: &str) -> String {
        if let Some(rest) = name.strip_prefix(&format!("{}.", self.stored_decoder)) {
            return format!("{}.{rest}", self.decoder_path);
        }
        match name.strip_prefix(&self.stored_head) {
            Some(rest) if rest.is_empty() || rest.starts_with('.') => {
                format!("{OUTPUT_HEAD}{rest}")
            }
            _ => name.to_owned(),
        }
    }
}

/// The linear modules a [`DecoderLayer`] may have (a model has those
/// [`LlamaConfig::layer_linear_shapes`] names; the others stay empty) as
/// (path under `model.layers.N`, reference), shared (`layer_linears!(l)`) or mutable
/// (`layer_linears!(l, mut)`): the one list of their fields, behind
/// [`LlamaForCausalLM::linear_layers`], [`LlamaForCausalLM::linear_layers_mut`],
/// loading and parameter counts.
macro_rules! layer_linears {
    ($l:expr $(, $m:ident)?) => {
        [
            ("self_attn.q_proj", &$($m)? $l.self_attn.q_proj),
            ("self_attn.k_proj", &$($m)? $l.self_attn.k_proj),
            ("self_attn.v_proj", &$($m)? $l.self_attn.v_proj),
            ("self_attn.qkv_proj", &$($m)? $l.self_attn.qkv_proj),
            ("self_attn.o_proj", &$($m)? $l.self_attn.o_proj),
            ("mlp.gate_proj", &$($m)? $l.mlp.gate_proj),
            ("mlp.up_proj", &$($m)? $l.mlp.up_proj),
            ("mlp.gate_up_proj", &$($m)? $l.mlp.gate_up_proj),
            ("mlp.down_proj", &$($m)? $l.mlp.down_proj),
        ]
    };
}

/// The output projection's module path (excluded by `all-linear`).
pub const OUTPUT_HEAD: &str = "lm_head";

/// RoPE settings from `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (earlier versions).
fn rope(raw: &RawConfig) -> Result<(f64, RopeScaling)> {
    let params = raw
        .json
        .get("rope_parameters")
        .filter(|v| !v.is_null())
        .or_else(|| raw.json.get("rope_scaling").filter(|v| !v.is_null()));
    let field = if raw.json.contains_key("rope_parameters") {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let theta = raw.opt_f64("rope_theta")?.unwrap_or(10000.0);
    rope_from(raw, params, field, theta)
}

/// RoPE settings from one `rope_parameters`-style object (`None`: the
/// default RoPE with `theta`), named `field` in errors. An unknown
/// `rope_type` is refused by name.
pub fn rope_from(
    raw: &RawConfig,
    params: Option<&serde_json::Value>,
    field: &str,
    theta: f64,
) -> Result<(f64, RopeScaling)> {
    let theta = raw.number_in(params, field, "rope_theta")?.unwrap_or(theta);
    let rope_type = match raw.str_in(params, field, "rope_type")? {
        Some(t) => t,
        None => raw.str_in(params, field, "type")?.unwrap_or("default"),
    };
    let need = |k: &str| {
        raw.number_in(params, field, k)?.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: field `{field}.{k}` missing for rope_type {rope_type}",
                raw.path.display()
            )
        })
    };
    // Phi-3's config maps the names of earlier releases to `longrope`.
    let phi3 = raw.model_type()? == "phi3";
    let rope_type = match rope_type {
        "su" | "yarn" if phi3 => "longrope",
        t => t,
    };
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "longrope" if phi3 => long_rope(raw, params, field)?,
        "longrope" => bail!(
            "{}: field `{field}.rope_type` is `longrope`, which peft-rs implements for Phi-3 \
             (model_type phi3) only",
            raw.path.display()
        ),
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => bail!(
            "{}: field `{field}.rope_type` is `{other}`; supported: default, linear, llama3, longrope (phi3)",
            raw.path.display()
        ),
    };
    Ok((theta, scaling))
}

/// Phi-3's LongRoPE settings, read as transformers' `Phi3Config` does: the
/// top-level `original_max_position_embeddings` (4096 when absent) wins over
/// one inside the RoPE parameters, and the attention factor defaults to
/// `sqrt(1 + ln(factor) / ln(original))` with `factor` =
/// `max_position_embeddings / original` unless the parameters give one.
fn long_rope(
    raw: &RawConfig,
    params: Option<&serde_json::Value>,
    field: &str,
) -> Result<RopeScaling> {
    let factors = |k: &str| -> Result<Vec<f64>> {
        let list = params.and_then(|p| p.get(k)).and_then(|v| v.as_array());
        let values: Option<Vec<f64>> = list.and_then(|a| a.iter().map(|v| v.as_f64()).collect());
        match values {
            Some(v) if !v.is_empty() && v.iter().all(|x| x.is_finite() && *x > 0.0) => Ok(v),
            _ => bail!(
                "{}: field `{field}.{k}` must be a list of positive numbers for rope_type longrope",
                raw.path.display()
            ),
        }
    };
    let short_factor = factors("short_factor")?;
    let long_factor = factors("long_factor")?;
    let original = raw
        .opt_usize("original_max_position_embeddings")?
        .unwrap_or(4096);
    raw.ensure(
        original > 1,
        "original_max_position_embeddings",
        "must be above 1",
    )?;
    let get = |k: &str| params.and_then(|p| p.get(k)).filter(|v| !v.is_null());
    let number = |k: &str| -> Result<Option<f64>> {
        get(k)
            .map(|v| {
                v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: field `{field}.{k}` must be a number",
                        raw.path.display()
                    )
                })
            })
            .transpose()
    };
    let attention_factor = match number("attention_factor")? {
        Some(a) => a,
        None => {
            let factor = match number("factor")? {
                Some(f) => f,
                None => {
                    let max = raw.opt_usize("max_position_embeddings")?.unwrap_or(4096);
                    max as f64 / original as f64
                }
            };
            if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / (original as f64).ln()).sqrt()
            }
        }
    };
    raw.ensure(
        attention_factor > 0.0,
        &format!("{field}.attention_factor"),
        "must be positive",
    )?;
    Ok(RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings: original as i64,
        attention_factor,
    })
}

/// Precomputed rotary frequencies.
pub struct RotaryEmbedding {
    inv_freq: Tensor,
    /// LongRoPE: the frequencies for sequences longer than the `i64`.
    long: Option<(Tensor, i64)>,
    /// What cos and sin are multiplied by (LongRoPE's attention factor; else 1).
    attention_scaling: f64,
}

impl RotaryEmbedding {
    fn new(rotary_dim: usize, theta: f64, scaling: &RopeScaling, device: Device) -> Self {
        // Computed with the same fp32 tensor operations as transformers'
        // `_compute_default_rope_parameters` / `_compute_llama3_parameters` /
        // `_compute_longrope_parameters`, so that frequencies agree to the last bit.
        let d = rotary_dim as i64;
        let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / d as f64;
        let powers = Tensor::pow_scalar(theta, &exponent);
        let inv_freq = powers.reciprocal();
        let divided = |factors: &[f64]| {
            let f = Tensor::from_slice(factors).to_kind(Kind::Float);
            (f * &powers).reciprocal().to_device(device)
        };
        let (inv_freq, long, attention_scaling) = match scaling {
            RopeScaling::Default => (inv_freq, None, 1.0),
            RopeScaling::Linear { factor } => (inv_freq / *factor, None, 1.0),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = 2.0 * std::f64::consts::PI / &inv_freq;
                let scaled = (&inv_freq / factor).where_self(&wavelen.gt(low_wavelen), &inv_freq);
                let smooth =
                    (old / &wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed: Tensor = (1.0 - &smooth) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen
                    .lt(high_wavelen)
                    .logical_not()
                    .logical_and(&wavelen.gt(low_wavelen).logical_not());
                (smoothed.where_self(&medium, &scaled), None, 1.0)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => (
                divided(short_factor),
                Some((divided(long_factor), *original_max_position_embeddings)),
                *attention_factor,
            ),
        };
        Self {
            inv_freq: inv_freq.to_device(device),
            long,
            attention_scaling,
        }
    }

    /// Whether the frequencies depend on the sequence length (LongRoPE).
    fn depends_on_length(&self) -> bool {
        self.long.is_some()
    }

    /// The frequencies for a forward pass whose sequence length (largest
    /// position + 1, as transformers' `longrope_frequency_update` takes it)
    /// is `seq_len`: LongRoPE's long ones above the original length.
    fn inv_freq_for(&self, seq_len: i64) -> &Tensor {
        match &self.long {
            Some((long, original)) if seq_len > *original => long,
            _ => &self.inv_freq,
        }
    }

    fn cos_sin_of(&self, emb: Tensor, kind: Kind) -> (Tensor, Tensor) {
        let (cos, sin) = (emb.cos(), emb.sin());
        if self.attention_scaling == 1.0 {
            return (cos.to_kind(kind), sin.to_kind(kind));
        }
        let a = self.attention_scaling;
        ((cos * a).to_kind(kind), (sin * a).to_kind(kind))
    }

    /// `cos` and `sin` for positions `offset..offset+len`, `[1, 1, len, head_dim]`.
    fn cos_sin(&self, offset: i64, len: i64, kind: Kind) -> (Tensor, Tensor) {
        let inv_freq = self.inv_freq_for(offset + len);
        let pos = Tensor::arange_start(offset, offset + len, (Kind::Float, inv_freq.device()));
        let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(0).unsqueeze(0);
        self.cos_sin_of(emb, kind)
    }

    /// `cos` and `sin` for per-row positions `[batch, seq]`, `[batch, 1, seq, head_dim]`
    /// (packed examples restart at 0; left-padded rows start after their
    /// padding), in a forward pass of sequence length `seq_len`.
    fn cos_sin_at(&self, position_ids: &Tensor, seq_len: i64, kind: Kind) -> (Tensor, Tensor) {
        let inv_freq = self.inv_freq_for(seq_len);
        let pos = position_ids
            .to_device(inv_freq.device())
            .to_kind(Kind::Float);
        let freqs = pos.unsqueeze(-1) * inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        self.cos_sin_of(emb, kind)
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let d = x.size().last().copied().unwrap_or(0);
    let r = cos.size().last().copied().unwrap_or(0);
    if r == d {
        return x * cos + rotate_half(x) * sin;
    }
    // Partial rotary (Phi-3): the first `r` dimensions rotate, the rest pass.
    let x_rot = x.narrow(-1, 0, r);
    let rotated = &x_rot * cos + rotate_half(&x_rot) * sin;
    Tensor::cat(&[&rotated, &x.narrow(-1, r, d - r)], -1)
}

/// The sequence length a forward pass with explicit positions has for
/// LongRoPE, as transformers computes it (`max(position_ids) + 1`). In
/// batched generation (left padding) that is the longest row: all cached and
/// new columns, which finished rows that left the batch still count.
fn rope_length(r: &RotaryEmbedding, input: &DecoderInput, past: i64, len: i64) -> i64 {
    if !r.depends_on_length() {
        return past + len;
    }
    match (input.layout, input.position_ids) {
        (AttentionLayout::Padded { .. }, _) | (_, None) => past + len,
        (_, Some(p)) => p.max().int64_value(&[]) + 1,
    }
}

/// Keys and values of earlier positions, one entry per layer.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        match self.layers.first() {
            Some(Some((k, _))) => k.size()[2],
            _ => 0,
        }
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows `rows` (finished rows leave a batched generation).
    pub fn select_rows(&mut self, rows: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, rows);
            *v = v.index_select(0, rows);
        }
    }
}

/// How the tokens of a batch may see each other.
#[derive(Clone, Copy)]
pub enum AttentionLayout<'a> {
    /// Causal within each row. Padding, if any, is on the right, where real
    /// tokens never see it; the fast kernels apply (no mask).
    Causal,
    /// Several examples packed in each row: causal within each segment, no
    /// attention across segments. `[batch, seq]` segment ids (1, 2, ...; 0 on
    /// padding).
    Packed {
        /// `[batch, seq]` segment ids.
        segment_ids: &'a Tensor,
    },
    /// Left-padded rows (batched generation): `[batch, past + seq]`, 1 on
    /// real tokens, 0 on padding, over the cached and the new positions.
    Padded {
        /// `[batch, past + seq]` attention mask.
        attention_mask: &'a Tensor,
    },
}

/// The tokens a decoder forward pass reads and how they are laid out.
#[derive(Clone, Copy)]
pub struct DecoderInput<'a> {
    /// `[batch, seq]` token ids.
    pub input_ids: &'a Tensor,
    /// `[batch, seq]` positions for RoPE; `None`: past..past+seq for every row.
    pub position_ids: Option<&'a Tensor>,
    /// How tokens attend.
    pub layout: AttentionLayout<'a>,
}

impl<'a> DecoderInput<'a> {
    /// A right-padded (or unpadded) batch: positions from 0, causal attention.
    pub fn causal(input_ids: &'a Tensor) -> Self {
        Self {
            input_ids,
            position_ids: None,
            layout: AttentionLayout::Causal,
        }
    }
}

/// What may change the decoder's activations between modules, at typed
/// points: regularizers in training, nothing in plain inference.
pub trait ForwardHooks {
    /// The output of `model.embed_tokens`.
    fn embedding_output(&mut self, x: Tensor) -> Tensor {
        x
    }
    /// The output of `model.layers.{i}`.
    fn layer_output(&mut self, _i: usize, x: Tensor) -> Tensor {
        x
    }
    /// The seed of layer `i`'s random draws (adapter dropout). With one, the
    /// layer runs inside [`crate::regularizers::rng::with_torch_seed`], so a
    /// recomputed layer (gradient checkpointing) draws the same masks.
    fn layer_seed(&self, _i: usize) -> Option<u64> {
        None
    }
}

/// No hooks.
pub struct NoHooks;

impl ForwardHooks for NoHooks {}

/// Which attention kernel a call can use. Flash attention takes no mask; the
/// memory-efficient kernel (libtorch 2.11) takes no unequal head counts; with
/// both a mask and grouped-query attention only the math kernel (which builds
/// fp32 `[b, h, t, T]` scores) would remain, so keys and values are expanded to
/// the query heads first, as transformers' `repeat_kv` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// No mask, causal: flash or memory-efficient kernels, grouped heads as they are.
    CausalGrouped,
    /// No mask, causal, equal head counts.
    Causal,
    /// No mask and no causal rule (one query over cached keys).
    Full,
    /// A mask; keys and values expanded to the query heads when they are grouped.
    Masked {
        /// Whether keys and values are repeated to the query heads.
        expand_kv: bool,
    },
}

impl AttentionPath {
    /// The path for `q_heads` query heads over `kv_heads` key/value heads,
    /// `q_len` queries, with or without an explicit mask.
    pub fn choose(q_heads: i64, kv_heads: i64, q_len: i64, masked: bool) -> Self {
        let grouped = kv_heads != q_heads;
        match (masked, q_len > 1) {
            (true, _) => Self::Masked { expand_kv: grouped },
            (false, true) if grouped => Self::CausalGrouped,
            (false, true) => Self::Causal,
            (false, false) => Self::Full,
        }
    }
}

/// The output of [`LlamaForCausalLM::decode`].
pub struct DecoderOutput {
    /// `[batch, seq, hidden]` after the final norm.
    pub hidden: Tensor,
    /// With gradient checkpointing: what the backward pass rebuilds the layers from.
    pub recompute: Option<Recompute>,
}

/// The saved inputs of each decoder layer, for gradient checkpointing.
pub struct Recompute {
    inputs: Vec<Tensor>,
    top: Tensor,
    rope: Vec<(Tensor, Tensor)>,
    masks: Vec<Option<Tensor>>,
}

impl Recompute {
    /// Once the gradient has reached the last layer's output (backward from
    /// the loss through the final norm), recomputes each layer, last to
    /// first, with the same seeds and hooks, and backpropagates through it.
    pub fn backward(self, model: &LlamaForCausalLM, hooks: &mut dyn ForwardHooks) {
        let mut grad = self.top.grad();
        for i in (0..self.inputs.len()).rev() {
            // The first layer's input (the embeddings) needs no gradient.
            let input = if i > 0 {
                self.inputs[i].detach().set_requires_grad(true)
            } else {
                self.inputs[i].shallow_clone()
            };
            let out = model.run_layer(i, &input, &self.rope, self.masks[i].as_ref(), None, &*hooks);
            let out = hooks.layer_output(i, out);
            (out * &grad).sum(Kind::Float).backward();
            if i > 0 {
                grad = input.grad();
            }
        }
    }
}

/// `model.layers.N.self_attn`.
pub struct Attention {
    /// `q_proj`.
    pub q_proj: Linear,
    /// `k_proj`.
    pub k_proj: Linear,
    /// `v_proj`.
    pub v_proj: Linear,
    /// `o_proj`.
    pub o_proj: Linear,
    /// `qkv_proj` (Phi-3; empty elsewhere).
    pub qkv_proj: Linear,
    /// `q_norm`, over each query head (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm>,
    /// `k_norm`, over each key head (Qwen3, Gemma 3).
    pub k_norm: Option<RmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    sliding_window: Option<i64>,
    scale: f64,
    fused: bool,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are [batch, seq, hidden]");
        let (cos, sin) = rope;
        // `[b, t, n, d]`, normed per head where the model does, then `[b, n, t, d]`.
        let heads = |y: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let y = y.view([b, t, n, self.head_dim]);
            match norm {
                Some(norm) => norm.forward(&y),
                None => y,
            }
            .transpose(1, 2)
        };
        let (q, k, v) = if self.fused {
            let qkv = self.qkv_proj.forward(x);
            let (nq, nkv) = (
                self.num_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
            );
            (
                qkv.narrow(-1, 0, nq),
                qkv.narrow(-1, nq, nkv),
                qkv.narrow(-1, nq + nkv, nkv),
            )
        } else {
            let [q, k, v] = forward_same_input([&self.q_proj, &self.k_proj, &self.v_proj], x);
            (q, k, v)
        };
        let q = heads(q, self.num_heads, &self.q_norm);
        let q = apply_rotary(&q, cos, sin);
        let k = heads(k, self.num_kv_heads, &self.k_norm);
        let mut k = apply_rotary(&k, cos, sin);
        let mut v = heads(v, self.num_kv_heads, &None);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let path = AttentionPath::choose(self.num_heads, self.num_kv_heads, t, mask.is_some());
        let scale = Some(self.scale);
        let y = match path {
            AttentionPath::Masked { expand_kv } => {
                if expand_kv {
                    let rep = self.num_heads / self.num_kv_heads;
                    k = k.repeat_interleave_self_int(rep, 1, None);
                    v = v.repeat_interleave_self_int(rep, 1, None);
                }
                Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, scale, false)
            }
            AttentionPath::CausalGrouped | AttentionPath::Causal | AttentionPath::Full => {
                Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    None::<&Tensor>,
                    0.0,
                    path != AttentionPath::Full,
                    scale,
                    self.num_kv_heads != self.num_heads,
                )
            }
        };
        let y = y
            .transpose(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward(&y)
    }
}

/// The boolean attention masks of one forward pass (`true`: may attend),
/// built once and shared by every layer with the same window.
struct Masks<'a> {
    layout: AttentionLayout<'a>,
    past: i64,
    len: i64,
    device: Device,
    built: Vec<(Option<i64>, Option<Tensor>)>,
}

impl<'a> Masks<'a> {
    fn new(layout: AttentionLayout<'a>, past: i64, len: i64, device: Device) -> Self {
        Self {
            layout,
            past,
            len,
            device,
            built: Vec::new(),
        }
    }

    /// The mask for a layer with sliding `window`, or `None` where the
    /// causal rule alone (or no rule, for one query) says it all.
    fn get(&mut self, window: Option<i64>) -> Option<&Tensor> {
        if let Some(i) = self.built.iter().position(|(w, _)| *w == window) {
            return self.built[i].1.as_ref();
        }
        let m = self.build(window);
        self.built.push((window, m));
        self.built.last().and_then(|(_, m)| m.as_ref())
    }

    fn build(&self, window: Option<i64>) -> Option<Tensor> {
        let (past, t) = (self.past, self.len);
        let total = past + t;
        let window_bites = window.is_some_and(|w| total > w);
        let q = Tensor::arange_start(past, total, (Kind::Int64, self.device)).unsqueeze(1);
        let k = Tensor::arange(total, (Kind::Int64, self.device)).unsqueeze(0);
        let causal_window = || {
            let mut allowed = k.le_tensor(&q);
            if let Some(w) = window {
                allowed = allowed.logical_and(&(&q - &k).lt(w));
            }
            allowed
        };
        match self.layout {
            AttentionLayout::Causal => {
                if !window_bites && (past == 0 || t == 1) {
                    return None;
                }
                Some(causal_window())
            }
            AttentionLayout::Packed { segment_ids } => {
                // [b, 1, t, t]: same segment, not padding, and causal.
                let seg = segment_ids.to_device(self.device);
                let same = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1));
                let real = seg.ne(0).unsqueeze(1);
                Some(
                    same.logical_and(&real)
                        .logical_and(&causal_window())
                        .unsqueeze(1),
                )
            }
            AttentionLayout::Padded { attention_mask } => {
                // [b, 1, t, T]: real keys only, and causal.
                let keys = attention_mask.to_device(self.device).ne(0).unsqueeze(1);
                Some(keys.logical_and(&causal_window()).unsqueeze(1))
            }
        }
    }
}

/// `model.layers.N.mlp`.
pub struct Mlp {
    /// `gate_proj`.
    pub gate_proj: Linear,
    /// `up_proj`.
    pub up_proj: Linear,
    /// `down_proj`.
    pub down_proj: Linear,
    /// `gate_up_proj` (Phi-3; empty elsewhere).
    pub gate_up_proj: Linear,
    act: Activation,
    fused: bool,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (gate, up) = if self.fused {
            let gu = self.gate_up_proj.forward(x);
            let half = gu.size().last().copied().unwrap_or(0) / 2;
            (gu.narrow(-1, 0, half), gu.narrow(-1, half, half))
        } else {
            let [gate, up] = forward_same_input([&self.gate_proj, &self.up_proj], x);
            (gate, up)
        };
        let gate = match self.act {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
        };
        self.down_proj.forward(&(gate * up))
    }
}

/// `model.layers.N`.
pub struct DecoderLayer {
    /// `self_attn`.
    pub self_attn: Attention,
    /// `mlp`.
    pub mlp: Mlp,
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm,
    /// `pre_feedforward_layernorm` (Gemma 3).
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    /// `post_feedforward_layernorm` (Gemma 3).
    pub post_feedforward_layernorm: Option<RmsNorm>,
    /// Whether the layer uses `model.rotary_emb_local` (Gemma 3's sliding layers).
    local_rope: bool,
}

impl DecoderLayer {
    /// One pre-norm residual block.
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let a = self
            .self_attn
            .forward(&self.input_layernorm.forward(x), rope, mask, cache);
        if let (Some(pre), Some(post)) = (
            &self.pre_feedforward_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            // Gemma 3: attention and MLP outputs are normed before each residual add.
            let h = x + self.post_attention_layernorm.forward(&a);
            let out = post.forward(&self.mlp.forward(&pre.forward(&h)));
            return h + out;
        }
        let h = x + a;
        let out = self.mlp.forward(&self.post_attention_layernorm.forward(&h));
        h + out
    }
}

/// `model`: embeddings, decoder layers and the final norm.
pub struct LlamaModel {
    /// `embed_tokens.weight`, `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    /// `layers`.
    pub layers: Vec<DecoderLayer>,
    /// `norm`.
    pub norm: RmsNorm,
    /// Rotary frequencies (not a weight).
    pub rotary_emb: RotaryEmbedding,
    /// The sliding-window layers' own rotary frequencies (Gemma 3).
    pub rotary_emb_local: Option<RotaryEmbedding>,
}

/// A Llama-family causal language model: `model` plus `lm_head`.
pub struct LlamaForCausalLM {
    /// The configuration it was built from.
    pub config: LlamaConfig,
    /// `model`.
    pub model: LlamaModel,
    /// `lm_head`; shares `model.embed_tokens` when embeddings are tied.
    pub lm_head: Linear,
    kind: Kind,
    device: Device,
}

impl LlamaForCausalLM {
    /// Builds the model from checkpoint tensors, checking every shape against the config.
    pub fn load(config: LlamaConfig, w: &Weights) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size as i64, c.head_dim as i64);
        let (nh, nkv) = (c.num_attention_heads as i64, c.num_key_value_heads as i64);
        let m = w.pp(&c.stored_decoder);
        let embed_tokens = m.get("embed_tokens.weight", &[c.vocab_size as i64, h])?;
        let norm_of = |w: &Weights, name: &str, width: i64| -> Result<RmsNorm> {
            let weight = w.get(&format!("{name}.weight"), &[width])?;
            Ok(RmsNorm {
                // Gemma's `1 + w` in fp32, as its forward computes it each time.
                weight: if c.gemma_norms {
                    weight.to_kind(Kind::Float) + 1.0
                } else {
                    weight
                },
                eps: c.rms_norm_eps,
                scale_in_fp32: c.gemma_norms,
            })
        };
        let norm = |w: &Weights, name: &str| norm_of(w, name, h);
        let sandwich = |w: &Weights, name: &str| -> Result<Option<RmsNorm>> {
            c.sandwich_norms.then(|| norm(w, name)).transpose()
        };
        let head_norm = |w: &Weights, name: &str| -> Result<Option<RmsNorm>> {
            c.qk_norm
                .then(|| norm_of(&w.pp("self_attn"), name, hd))
                .transpose()
        };
        let shapes = c.layer_linear_shapes();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for (i, window) in c.sliding_window.iter().enumerate() {
            let l = m.pp(&format!("layers.{i}"));
            let empty = || Linear::new(Tensor::new(), None);
            let mut layer = DecoderLayer {
                self_attn: Attention {
                    q_proj: empty(),
                    k_proj: empty(),
                    v_proj: empty(),
                    o_proj: empty(),
                    qkv_proj: empty(),
                    q_norm: head_norm(&l, "q_norm")?,
                    k_norm: head_norm(&l, "k_norm")?,
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                    sliding_window: window.map(|w| w as i64),
                    scale: c
                        .attention_scale
                        .unwrap_or_else(|| 1.0 / (c.head_dim as f64).sqrt()),
                    fused: c.fused_projections,
                },
                mlp: Mlp {
                    gate_proj: empty(),
                    up_proj: empty(),
                    down_proj: empty(),
                    gate_up_proj: empty(),
                    act: c.hidden_act,
                    fused: c.fused_projections,
                },
                input_layernorm: norm(&l, "input_layernorm")?,
                post_attention_layernorm: norm(&l, "post_attention_layernorm")?,
                pre_feedforward_layernorm: sandwich(&l, "pre_feedforward_layernorm")?,
                post_feedforward_layernorm: sandwich(&l, "post_feedforward_layernorm")?,
                local_rope: c.local_rope.is_some() && window.is_some(),
            };
            let mut loaded = 0;
            for (name, lin) in layer_linears!(layer, mut) {
                if let Some(&(_, i_, o, bias)) = shapes.iter().find(|s| s.0 == name) {
                    *lin = l.linear(name, i_, o, bias)?;
                    loaded += 1;
                }
            }
            if loaded != shapes.len() {
                bail!("internal: a linear module of {:?} has no field", shapes);
            }
            layers.push(layer);
        }
        let lm_head = if c.tie_word_embeddings {
            Linear::new(embed_tokens.shallow_clone(), None)
        } else {
            w.linear(&c.stored_head, h, c.vocab_size as i64, false)?
        };
        let model = LlamaModel {
            embed_tokens,
            layers,
            norm: norm(&m, "norm")?,
            rotary_emb: RotaryEmbedding::new(
                c.rotary_dim,
                c.rope_theta,
                &c.rope_scaling,
                w.device(),
            ),
            rotary_emb_local: c.local_rope.as_ref().map(|(theta, scaling)| {
                RotaryEmbedding::new(c.rotary_dim, *theta, scaling, w.device())
            }),
        };
        Ok(Self {
            kind: w.kind(),
            device: w.device(),
            config,
            model,
            lm_head,
        })
    }

    /// The dtype of the frozen weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.device
    }

    /// `model.embed_tokens(input_ids)`: `[batch, seq]` ids to `[batch, seq, hidden]`.
    /// With `embed_scale` (Gemma) the embeddings are multiplied by it, cast
    /// to the model dtype first, inside the module as transformers'
    /// `Gemma3TextScaledWordEmbedding` does: what a hook on `embed_tokens`
    /// (NEFTune) sees is the scaled embedding.
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        let x = Tensor::embedding(&self.model.embed_tokens, input_ids, -1, false, false);
        match self.config.embed_scale {
            None => x,
            Some(scale) => {
                // transformers keeps √hidden as an fp32 buffer and casts it to the weight's dtype.
                let scale =
                    Tensor::scalar_tensor(scale, (Kind::Float, x.device())).to_kind(x.kind());
                x * scale
            }
        }
    }

    /// The decoder, the one forward path of training, evaluation and
    /// generation: embeddings, the embedding hook, each layer (seeded when
    /// the hooks give a seed) and its hook, the final norm.
    ///
    /// With `recompute`, the layers run without an autograd graph and only
    /// their inputs are kept (gradient checkpointing); the returned
    /// [`Recompute`] rebuilds each layer during the backward pass.
    pub fn decode(
        &self,
        input: &DecoderInput,
        mut cache: Option<&mut KvCache>,
        hooks: &mut dyn ForwardHooks,
        recompute: bool,
    ) -> DecoderOutput {
        let mut x = hooks.embedding_output(self.embed(input.input_ids));
        let past = cache.as_deref().map_or(0, KvCache::len);
        let t = x.size()[1];
        let cos_sin = |r: &RotaryEmbedding| match input.position_ids {
            Some(p) => r.cos_sin_at(p, rope_length(r, input, past, t), x.kind()),
            None => r.cos_sin(past, t, x.kind()),
        };
        let mut rope = vec![cos_sin(&self.model.rotary_emb)];
        rope.extend(self.model.rotary_emb_local.as_ref().map(cos_sin));
        let mut masks = Masks::new(input.layout, past, t, x.device());
        let layer_masks: Vec<Option<Tensor>> = self
            .model
            .layers
            .iter()
            .map(|l| {
                masks
                    .get(l.self_attn.sliding_window)
                    .map(Tensor::shallow_clone)
            })
            .collect();
        let mut inputs = Vec::new();
        {
            let _no_grad = recompute.then(tch::no_grad_guard);
            for (i, mask) in layer_masks.iter().enumerate() {
                if recompute {
                    inputs.push(x.detach());
                }
                let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                x = self.run_layer(i, &x, &rope, mask.as_ref(), slot, &*hooks);
                x = hooks.layer_output(i, x);
            }
        }
        if !recompute {
            return DecoderOutput {
                hidden: self.model.norm.forward(&x),
                recompute: None,
            };
        }
        let top = x.detach().set_requires_grad(true);
        DecoderOutput {
            hidden: self.model.norm.forward(&top),
            recompute: Some(Recompute {
                inputs,
                top,
                rope,
                masks: layer_masks,
            }),
        }
    }

    /// Whether a forward pass over `past` cached and `len` new positions
    /// needs RoPE frequencies other than those the cache was built with
    /// (LongRoPE crossing `original_max_position_embeddings`): transformers'
    /// Phi-3 then drops the cache and runs the whole sequence again
    /// (`Phi3ForCausalLM.prepare_inputs_for_generation`), and so does
    /// [`crate::generate`].
    pub fn rope_restarts_cache(&self, past: i64, len: i64) -> bool {
        match &self.model.rotary_emb.long {
            Some((_, original)) => past > 0 && past <= *original && past + len > *original,
            None => false,
        }
    }

    fn run_layer(
        &self,
        i: usize,
        x: &Tensor,
        rope: &[(Tensor, Tensor)],
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        hooks: &dyn ForwardHooks,
    ) -> Tensor {
        let layer = &self.model.layers[i];
        let rope = &rope[usize::from(layer.local_rope)];
        match hooks.layer_seed(i) {
            Some(seed) => with_torch_seed(seed, || layer.forward(x, rope, mask, cache)),
            None => layer.forward(x, rope, mask, cache),
        }
    }

    /// The final hidden states (after `model.norm`) of a forward pass
    /// without gradient checkpointing; `cache` makes it an incremental step.
    pub fn forward_hidden(
        &self,
        input: &DecoderInput,
        cache: Option<&mut KvCache>,
        hooks: &mut dyn ForwardHooks,
    ) -> Tensor {
        self.decode(input, cache, hooks, false).hidden
    }

    /// `lm_head(hidden)`: `[..., hidden]` to `[..., vocab]` logits.
    /// With `final_logit_softcapping` (Gemma), `cap · tanh(logits / cap)`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = self.lm_head.forward(hidden);
        match self.config.final_logit_softcapping {
            None => logits,
            Some(cap) => (logits / cap).tanh() * cap,
        }
    }

    /// The head's weight and bias when the logits are plainly `x Wᵀ + b`
    /// (a dense weight, no adapter, no soft-capping), so that callers may
    /// compute with it directly.
    pub fn plain_lm_head(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match (&self.lm_head.weight, &self.lm_head.adapter) {
            (FrozenWeight::Dense(w), None) if self.config.final_logit_softcapping.is_none() => {
                Some((w, self.lm_head.bias.as_ref()))
            }
            _ => None,
        }
    }

    /// Logits for every position of a right-padded batch `[batch, seq]`.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.logits(&self.forward_hidden(&DecoderInput::causal(input_ids), None, &mut NoHooks))
    }

    fn layer_linear_names(&self) -> Vec<&'static str> {
        self.config
            .layer_linear_shapes()
            .iter()
            .map(|s| s.0)
            .collect()
    }

    /// Every linear layer with its Hugging Face module path, in model order
    /// (the order of [`LlamaConfig::linear_modules`]).
    pub fn linear_layers(&self) -> Vec<(String, &Linear)> {
        let names = self.layer_linear_names();
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter().enumerate() {
            for (name, lin) in layer_linears!(l) {
                if names.contains(&name) {
                    out.push((
                        format!("{}.layers.{i}.{name}", self.config.decoder_path),
                        lin,
                    ));
                }
            }
        }
        out.push((OUTPUT_HEAD.to_owned(), &self.lm_head));
        out
    }

    /// [`LlamaForCausalLM::linear_layers`], mutable (to attach, merge or
    /// unmerge adapters).
    pub fn linear_layers_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let names = self.layer_linear_names();
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            for (name, lin) in layer_linears!(l, mut) {
                if names.contains(&name) {
                    out.push((
                        format!("{}.layers.{i}.{name}", self.config.decoder_path),
                        lin,
                    ));
                }
            }
        }
        out.push((OUTPUT_HEAD.to_owned(), &mut self.lm_head));
        out
    }

    /// Bytes held by the frozen weights (tied weights counted once), and of
    /// those the linear layers stored quantized: `(all bytes, quantized
    /// bytes, quantized parameters)`.
    pub fn frozen_bytes(&self) -> (usize, usize, i64) {
        let dense = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let mut all = dense(&self.model.embed_tokens) + dense(&self.model.norm.weight);
        let (mut qbytes, mut qparams) = (0, 0);
        let mut count = |lin: &Linear, all: &mut usize| {
            let b = lin.weight.frozen_bytes();
            *all += b + lin.bias.as_ref().map_or(0, dense);
            if lin.weight.is_quantized() {
                qbytes += b;
                qparams += lin.weight.numel();
            }
        };
        let names = self.layer_linear_names();
        for l in &self.model.layers {
            for (name, lin) in layer_linears!(l) {
                if names.contains(&name) {
                    count(lin, &mut all);
                }
            }
            all += dense(&l.input_layernorm.weight) + dense(&l.post_attention_layernorm.weight);
            all += [
                &l.self_attn.q_norm,
                &l.self_attn.k_norm,
                &l.pre_feedforward_layernorm,
                &l.post_feedforward_layernorm,
            ]
            .iter()
            .filter_map(|n| n.as_ref())
            .map(|n| dense(&n.weight))
            .sum::<usize>();
        }
        if !self.config.tie_word_embeddings {
            count(&self.lm_head, &mut all);
        }
        (all, qbytes, qparams)
    }

    /// Number of frozen parameters (tied weights counted once).
    pub fn num_parameters(&self) -> i64 {
        let c = &self.config;
        let (h, v) = (c.hidden_size as i64, c.vocab_size as i64);
        let numel =
            |lin: &Linear| lin.weight.numel() + lin.bias.as_ref().map_or(0, |b| b.numel() as i64);
        let names = self.layer_linear_names();
        let mut n = v * h + h;
        for l in &self.model.layers {
            n += layer_linears!(l)
                .iter()
                .filter(|(name, _)| names.contains(name))
                .map(|(_, lin)| numel(lin))
                .sum::<i64>();
            n += 2 * h;
            n += [
                &l.self_attn.q_norm,
                &l.self_attn.k_norm,
                &l.pre_feedforward_layernorm,
                &l.post_feedforward_layernorm,
            ]
            .iter()
            .filter_map(|n| n.as_ref())
            .map(|n| n.weight.numel() as i64)
            .sum::<i64>();
        }
        if !c.tie_word_embeddings {
            n += v * h;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::AttentionPath;

    #[test]
    fn attention_path_expands_grouped_keys_whenever_a_mask_is_passed() {
        use AttentionPath::*;
        // (query heads, kv heads, query length, mask) -> path; SmolLM2 is 9 over 3.
        let cases = [
            // Training or prefill without padding: flash/efficient, GQA native.
            ((9, 3, 128, false), CausalGrouped),
            ((8, 8, 128, false), Causal),
            // One new token over the cache, nothing to mask.
            ((9, 3, 1, false), Full),
            ((8, 8, 1, false), Full),
            // Padding, packing, sliding windows (also decoding past the window):
            // a mask with grouped heads would leave only the math kernel.
            ((9, 3, 128, true), Masked { expand_kv: true }),
            ((9, 3, 1, true), Masked { expand_kv: true }),
            ((8, 8, 128, true), Masked { expand_kv: false }),
            ((8, 8, 1, true), Masked { expand_kv: false }),
        ];
        for ((q, kv, t, masked), want) in cases {
            assert_eq!(
                AttentionPath::choose(q, kv, t, masked),
                want,
                "{q}/{kv} heads, t={t}, mask={masked}"
            );
        }
    }
}
