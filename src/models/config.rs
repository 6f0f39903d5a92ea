//! The decoder's configuration, read from `config.json` (through
//! [`crate::config_json::RawConfig`], whose errors name the file and the
//! field): the fields every Llama-family config shares, and where the
//! modules are and are stored.

use anyhow::Result;

use super::mlp::Activation;
use super::rope::{rope, RopeScaling};
use crate::config_json::RawConfig;
use peft_adapters::lora::param::ParamShape;

/// The output projection's module path (excluded by `all-linear`).
pub const OUTPUT_HEAD: &str = "lm_head";

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
    /// RMS norms whose weight is held in fp32 and multiplies before the cast
    /// back to the model dtype (gpt-oss keeps its norms in fp32).
    pub fp32_norms: bool,
    /// A learned sink logit per attention head (`self_attn.sinks`, gpt-oss).
    pub attention_sinks: bool,
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
    /// Mixture-of-experts MLPs (Qwen3-MoE, Mixtral): which layers have them
    /// and how tokens are routed; `None` for dense models.
    pub moe: Option<MoeConfig>,
}

/// See [`LlamaConfig::parameter_part`]: (parameter path, expert, rows).
pub type ParameterPart = (String, Option<i64>, Option<(i64, i64)>);

/// How a mixture-of-experts model routes tokens to its experts.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per sparse layer (`num_experts`, Mixtral's `num_local_experts`).
    pub num_experts: usize,
    /// Experts each token is sent to (`num_experts_per_tok`).
    pub num_experts_per_tok: usize,
    /// Width of one expert's MLP (`moe_intermediate_size`; Mixtral's
    /// `intermediate_size`).
    pub moe_intermediate_size: usize,
    /// Whether the top-k routing weights are renormalized to sum to 1
    /// (`norm_topk_prob`; always in Mixtral).
    pub norm_topk_prob: bool,
    /// Per layer: whether its MLP is the sparse block (Qwen3-MoE's
    /// `decoder_sparse_step` and `mlp_only_layers` make some dense).
    pub sparse_layers: Vec<bool>,
    /// `router_aux_loss_coef`: the weight of the load-balancing loss.
    pub router_aux_loss_coef: f64,
    /// `output_router_logits`: whether transformers adds the load-balancing
    /// loss to the training loss.
    pub output_router_logits: bool,
    /// Where a checkpoint stores each expert's own tensors (the Hub's
    /// layout), as (the sparse block's stored name, gate, up, down):
    /// `("mlp", "gate_proj", "up_proj", "down_proj")` for Qwen3-MoE,
    /// `("block_sparse_moe", "w1", "w3", "w2")` for Mixtral.
    pub per_expert_names: (&'static str, &'static str, &'static str, &'static str),
    /// Whether the routing weights are cast back to the model dtype before
    /// they scale the experts' outputs (Qwen3-MoE) or stay fp32 (Mixtral).
    pub routing_weights_in_model_dtype: bool,
    /// How the router and the experts compute and are stored.
    pub style: ExpertStyle,
    /// Whether the sparse block registers its router before its experts
    /// (Mixtral, gpt-oss) or after them (Qwen3-MoE): the order PEFT
    /// creates, and draws, adapters on them.
    pub router_first: bool,
}

/// The two families of sparse MLPs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertStyle {
    /// Qwen3-MoE and Mixtral: the router `mlp.gate` takes a softmax over
    /// every expert, then the top k; experts `[experts, out, in]` with gate
    /// and up as the two halves of `gate_up_proj`, SiLU-gated, no biases.
    SwiGlu,
    /// gpt-oss: the router `mlp.router` (with a bias) takes the top k logits,
    /// then a softmax over them; experts stored `[experts, in, out]` with
    /// biases, gate and up interleaved, and the clamped SwiGLU
    /// `(clamp(up, ±limit) + 1) · g·σ(alpha·g)` with `g = min(gate, limit)`.
    GptOss {
        /// `swiglu_alpha`.
        alpha: f64,
        /// `swiglu_limit`.
        limit: f64,
    },
}

impl MoeConfig {
    /// The router's module name under `mlp`.
    pub fn router_name(&self) -> &'static str {
        match self.style {
            ExpertStyle::SwiGlu => "gate",
            ExpertStyle::GptOss { .. } => "router",
        }
    }
}

/// Which layers use a sliding window, from `layer_types`
/// (`sliding_attention` / `full_attention`, one per layer) or else every
/// layer but each `sliding_window_pattern`-th (`default_pattern` when absent:
/// Gemma 3's 6, gpt-oss's 2).
pub fn sliding_layers(raw: &RawConfig, n: usize, default_pattern: usize) -> Result<Vec<bool>> {
    match raw.json.get("layer_types") {
        Some(serde_json::Value::Array(a)) => {
            raw.ensure(a.len() == n, "layer_types", "must list one type per layer")?;
            a.iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => anyhow::bail!(
                        "{}: field `layer_types` holds {t}; supported: sliding_attention, full_attention",
                        raw.path.display()
                    ),
                })
                .collect()
        }
        _ => {
            let pattern = raw
                .opt_usize("sliding_window_pattern")?
                .or(raw.opt_usize("_sliding_window_pattern")?)
                .unwrap_or(default_pattern);
            raw.ensure(pattern > 0, "sliding_window_pattern", "must be positive")?;
            Ok((0..n).map(|i| (i + 1) % pattern != 0).collect())
        }
    }
}

impl MoeConfig {
    /// Reads the routing fields every MoE config shares: the number of
    /// experts (`num_experts` or `num_local_experts`: transformers maps one
    /// name to the other and saves either) and `num_experts_per_tok`
    /// (transformers' `defaults` where absent), and the aux-loss fields;
    /// `width` is the experts' MLP width.
    pub fn from_raw(
        raw: &RawConfig,
        defaults: (usize, usize),
        width: usize,
        layers: usize,
    ) -> Result<Self> {
        let (experts_field, stored) = match raw.opt_usize("num_experts")? {
            Some(n) => ("num_experts", Some(n)),
            None => ("num_local_experts", raw.opt_usize("num_local_experts")?),
        };
        let num_experts = stored.unwrap_or(defaults.0);
        raw.ensure(
            num_experts > 0 && num_experts <= 1 << 12,
            experts_field,
            &format!("{num_experts} is outside 1..=4096"),
        )?;
        let top_k = raw.opt_usize("num_experts_per_tok")?.unwrap_or(defaults.1);
        raw.ensure(
            top_k > 0 && top_k <= num_experts,
            "num_experts_per_tok",
            &format!("{top_k} must be between 1 and {experts_field} ({num_experts})"),
        )?;
        raw.ensure(
            width > 0 && width <= 1 << 22,
            "moe_intermediate_size",
            &format!("{width} is outside 1..=4194304"),
        )?;
        Ok(Self {
            num_experts,
            num_experts_per_tok: top_k,
            moe_intermediate_size: width,
            norm_topk_prob: true,
            sparse_layers: vec![true; layers],
            router_aux_loss_coef: raw.opt_f64("router_aux_loss_coef")?.unwrap_or(0.001),
            output_router_logits: raw.opt_bool("output_router_logits")?.unwrap_or(false),
            per_expert_names: ("mlp", "gate_proj", "up_proj", "down_proj"),
            routing_weights_in_model_dtype: true,
            style: ExpertStyle::SwiGlu,
            router_first: false,
        })
    }
}

impl LlamaConfig {
    /// One sliding window for every layer, from `sliding_window` (absent or
    /// null: full attention), as Mistral and Phi-3 read it.
    pub fn set_sliding_window(&mut self, raw: &RawConfig) -> Result<()> {
        let window = raw.opt_usize("sliding_window")?;
        raw.ensure(
            window != Some(0),
            "sliding_window",
            "must be positive or null",
        )?;
        self.sliding_window = vec![window; self.num_hidden_layers];
        Ok(())
    }

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
            fp32_norms: false,
            attention_sinks: false,
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
            moe: None,
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

    /// Whether layer `i`'s MLP is a mixture of experts.
    pub fn is_sparse(&self, i: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| m.sparse_layers.get(i).copied().unwrap_or(false))
    }

    /// [`LlamaConfig::layer_linear_shapes`] of layer `i`: a sparse layer has
    /// no dense MLP projections (its experts are 3D parameters, its router a
    /// parameter, not linear modules, as in transformers 5).
    pub fn layer_linear_shapes_at(&self, i: usize) -> Vec<(&'static str, i64, i64, bool)> {
        let mut shapes = self.layer_linear_shapes();
        if self.is_sparse(i) {
            shapes.retain(|s| !s.0.starts_with("mlp."));
        }
        shapes
    }

    /// The parameters an adapter may target directly (PEFT's
    /// `target_parameters`) with their stored shapes: per sparse layer the
    /// router's weight, then the experts' `gate_up_proj` and `down_proj` (the
    /// order transformers registers them; gpt-oss stores its experts
    /// `[experts, in, out]`).
    pub fn adaptable_parameters(&self) -> Vec<ParamShape> {
        let Some(moe) = &self.moe else {
            return Vec::new();
        };
        let (e, h, i) = (
            moe.num_experts as i64,
            self.hidden_size as i64,
            moe.moe_intermediate_size as i64,
        );
        let transposed = moe.style != ExpertStyle::SwiGlu;
        let (gate_up, down) = if transposed {
            (vec![e, h, 2 * i], vec![e, i, h])
        } else {
            (vec![e, 2 * i, h], vec![e, h, i])
        };
        let param = |path: String, shape: &Vec<i64>, transposed| ParamShape {
            path,
            shape: shape.clone(),
            transposed,
        };
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_sparse(l))
            .flat_map(|l| {
                let m = format!("{}.layers.{l}.mlp", self.decoder_path);
                let router = param(
                    format!("{m}.{}.weight", moe.router_name()),
                    &vec![e, h],
                    false,
                );
                let experts = [
                    param(format!("{m}.experts.gate_up_proj"), &gate_up, transposed),
                    param(format!("{m}.experts.down_proj"), &down, transposed),
                ];
                let mut all = vec![router];
                if moe.router_first {
                    all.extend(experts);
                } else {
                    all.splice(0..0, experts);
                }
                all
            })
            .collect()
    }

    /// Which part of an adaptable parameter (see
    /// [`LlamaConfig::adaptable_parameters`]) the stored tensor `name` is: the
    /// whole parameter (transformers 5's layout), or one expert's projection
    /// as the Hub stores it, as (parameter path, expert, rows of that
    /// expert's `[out, in]` ΔW: gate and up are the two halves of
    /// `gate_up_proj`). `None` for every other tensor.
    pub fn parameter_part(&self, name: &str) -> Option<ParameterPart> {
        let moe = self.moe.as_ref()?;
        let name = self.module_name(name);
        let rest = name.strip_prefix(&format!("{}.layers.", self.decoder_path))?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        if !self.is_sparse(layer) {
            return None;
        }
        let mlp = format!("{}.layers.{layer}.mlp", self.decoder_path);
        let whole = |p: &str| Some((format!("{mlp}.{p}"), None, None));
        let router = format!("{}.weight", moe.router_name());
        match rest.strip_prefix("mlp.") {
            Some(p) if p == router || p == "experts.gate_up_proj" || p == "experts.down_proj" => {
                return whole(p)
            }
            _ if moe.style != ExpertStyle::SwiGlu => return None,
            _ => {}
        }
        let (block, gate, up, down) = moe.per_expert_names;
        let rest = rest.strip_prefix(block)?.strip_prefix('.')?;
        if rest == "gate.weight" {
            return whole("gate.weight");
        }
        let (e, proj) = rest.strip_prefix("experts.")?.split_once('.')?;
        let e: i64 = e.parse().ok()?;
        let i = moe.moe_intermediate_size as i64;
        let part = |p: &str, rows| Some((format!("{mlp}.experts.{p}"), Some(e), rows));
        match proj.strip_suffix(".weight")? {
            p if p == gate => part("gate_up_proj", Some((0, i))),
            p if p == up => part("gate_up_proj", Some((i, i))),
            p if p == down => part("down_proj", None),
            _ => None,
        }
    }

    /// Every linear module as (Hugging Face path, in_features, out_features),
    /// in the order of [`LlamaForCausalLM::linear_layers`]; lets tools such
    /// as `merge` plan without loading the model.
    pub fn linear_modules(&self) -> Vec<(String, i64, i64)> {
        let mut v = Vec::new();
        for i in 0..self.num_hidden_layers {
            for (name, i_, o, _) in self.layer_linear_shapes_at(i) {
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
