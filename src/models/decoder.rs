//! The decoder, as transformers' `modeling_llama.py` computes it: layers,
//! the model, and its one forward path (with gradient checkpointing) shared
//! by training, evaluation and generation.
//!
//! Struct and field names mirror the Hugging Face module paths
//! (`model.layers.N.self_attn.q_proj`, `model.norm`, `lm_head`), so the file
//! reads next to transformers' code. What differs between architectures is
//! configuration (see [`super::config::LlamaConfig`] and the architecture
//! files); the decoder calls the hooks of [`peft_regularizers::hooks`] at the
//! embedding and after each layer and never knows what answers.

use tch::{Device, Kind, Tensor};

use super::attention::Attention;
use super::attention::{AttentionLayout, DecoderInput, KvCache, Masks};
use super::config::{LlamaConfig, OUTPUT_HEAD};
use super::mlp::Mlp;
use super::rope::RotaryEmbedding;
use std::sync::Arc;

use crate::dist::fsdp::{Fsdp, ShardedWeight};
use crate::nn::{Linear, Products, RmsNorm};
use crate::quant::FrozenWeight;
use peft_adapters::lora::param::ParamLora;
use peft_regularizers::hooks::{ForwardHooks, NoHooks};
use peft_regularizers::rng::with_torch_seed;

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

pub(crate) use layer_linears;

/// The output of [`LlamaForCausalLM::decode`].
pub struct DecoderOutput {
    /// `[batch, seq, hidden]` after the final norm.
    pub hidden: Tensor,
    /// With gradient checkpointing: what the backward pass rebuilds the layers from.
    pub recompute: Option<Recompute>,
    /// The router logits `[batch·seq, experts]` of each sparse (mixture-of-experts)
    /// layer, in layer order (transformers' `router_logits`); without an
    /// autograd graph under gradient checkpointing.
    pub router_logits: Vec<Tensor>,
}

/// How [`LlamaForCausalLM::decode`] keeps what the backward pass needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpointing {
    /// Every layer keeps its autograd graph.
    Off,
    /// Only each layer's input is kept, and the frozen products that
    /// [`KeptProducts`] names; the backward pass recomputes the layer
    /// (`--gradient-checkpointing`), replaying those products instead of
    /// multiplying by the weights again.
    On(KeptProducts),
}

/// Which frozen products (`x Wᵀ` of dense weights) a checkpointed layer
/// keeps from its forward pass for the recompute to replay. Each kept value
/// saves `hidden_size` multiply-adds of the recompute, whichever product it
/// belongs to: the choice is only how much memory to spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeptProducts {
    /// The attention's query, key, value and output projections
    /// (`--gradient-checkpointing-keep-attention`): their output widths,
    /// `heads·head_dim + 2·kv_heads·head_dim + hidden` values a token and layer.
    pub attention: bool,
    /// The MLP's gate and up projections (`--gradient-checkpointing-keep-mlp`):
    /// `2 · intermediate_size` values a token and layer, most of the recompute's work.
    pub mlp: bool,
}

impl Checkpointing {
    /// Recompute everything, keep nothing but each layer's input.
    pub const FULL: Self = Self::On(KeptProducts {
        attention: false,
        mlp: false,
    });

    /// From the settings (what to keep applies only with checkpointing).
    pub fn new(gradient_checkpointing: bool, keep: KeptProducts) -> Self {
        if gradient_checkpointing {
            Self::On(keep)
        } else {
            Self::Off
        }
    }

    /// Whether layers are recomputed in the backward pass.
    pub fn is_on(self) -> bool {
        self != Self::Off
    }
}

/// The frozen products one layer's forward pass kept, in the order the
/// recompute asks for them.
#[derive(Default)]
struct LayerProducts {
    attention: Vec<Option<Tensor>>,
    mlp: Vec<Option<Tensor>>,
}

/// The saved inputs of each decoder layer, for gradient checkpointing.
pub struct Recompute {
    inputs: Vec<Tensor>,
    /// Each layer's kept frozen products (empty lists without keeping).
    kept: Vec<LayerProducts>,
    top: Tensor,
    rope: Vec<(Tensor, Tensor)>,
    masks: Vec<Option<Tensor>>,
}

impl Recompute {
    /// Bytes of the frozen products kept for the recompute to replay: the
    /// attention's, the MLP's.
    pub fn kept_bytes(&self) -> (i64, i64) {
        let bytes = |list: &[Option<Tensor>]| -> i64 {
            list.iter()
                .flatten()
                .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
                .sum()
        };
        self.kept.iter().fold((0, 0), |(a, m), l| {
            (a + bytes(&l.attention), m + bytes(&l.mlp))
        })
    }

    /// Once the gradient has reached the last layer's output (backward from
    /// the loss through the final norm), recomputes each layer, last to
    /// first, with the same seeds and hooks, and backpropagates through it.
    /// `router_loss` maps a sparse layer's recomputed router logits to its
    /// share of a loss on them (the load-balancing loss), backpropagated
    /// with the layer.
    pub fn backward(
        self,
        model: &LlamaForCausalLM,
        hooks: &mut dyn ForwardHooks,
        router_loss: Option<&dyn Fn(&Tensor) -> Tensor>,
    ) {
        let mut grad = self.top.grad();
        let mut kept = self.kept;
        for i in (0..self.inputs.len()).rev() {
            // The first layer's input (the embeddings) needs no gradient.
            let input = if i > 0 {
                self.inputs[i].detach().set_requires_grad(true)
            } else {
                self.inputs[i].shallow_clone()
            };
            let whole = model.gather_layer(i, true);
            let (out, logits) = model.run_layer(
                i,
                &input,
                &self.rope,
                self.masks[i].as_ref(),
                LayerPass::Recompute(kept.pop().unwrap_or_default()),
                &*hooks,
            );
            let out = hooks.layer_output(i, out);
            let mut total = (out * &grad).sum(Kind::Float);
            if let (Some(f), Some(logits)) = (router_loss, logits) {
                total += f(&logits);
            }
            total.backward();
            drop(whole);
            if let Some(f) = model.fsdp() {
                f.layer_backward_done(i);
            }
            if i > 0 {
                grad = input.grad();
            }
        }
    }
}

/// What a layer is run for.
enum LayerPass<'a> {
    /// The forward pass, with the layer's generation cache if there is one,
    /// keeping the frozen products that [`KeptProducts`] names in the lists.
    Forward(
        Option<&'a mut Option<(Tensor, Tensor)>>,
        Option<(KeptProducts, &'a mut LayerProducts)>,
    ),
    /// Recomputed in the backward pass (gradient checkpointing), with the
    /// frozen products the forward pass kept (empty lists if none).
    Recompute(LayerProducts),
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
    pub(crate) local_rope: bool,
}

impl DecoderLayer {
    /// Every RMS norm of the layer (those the architecture has).
    pub fn norms(&self) -> impl Iterator<Item = &RmsNorm> {
        [
            Some(&self.input_layernorm),
            Some(&self.post_attention_layernorm),
            self.self_attn.q_norm.as_ref(),
            self.self_attn.k_norm.as_ref(),
            self.pre_feedforward_layernorm.as_ref(),
            self.post_feedforward_layernorm.as_ref(),
        ]
        .into_iter()
        .flatten()
    }

    /// One pre-norm residual block; a sparse layer's router logits beside it.
    /// With `unread`, the block is only backpropagated through and its
    /// output's value is not needed (a recomputed layer whose output hook
    /// does not read it): the MLP's last frozen product is skipped where the
    /// output is a plain residual sum. The attention's and the MLP's frozen
    /// products are kept or replayed as `attention` and `mlp` say.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        attention: &mut Products<'_>,
        mlp: &mut Products<'_>,
        unread: bool,
    ) -> (Tensor, Option<Tensor>) {
        let a = self.self_attn.forward(
            &self.input_layernorm.forward(x),
            rope,
            mask,
            cache,
            attention,
        );
        if let (Some(pre), Some(post)) = (
            &self.pre_feedforward_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            // Gemma 3: attention and MLP outputs are normed before each residual add.
            let h = x + self.post_attention_layernorm.forward(&a);
            // The post-norm reads the MLP's output: it is computed.
            let (out, logits) = self.mlp.forward(&pre.forward(&h), mlp, false);
            return (h + post.forward(&out), logits);
        }
        let h = x + a;
        let (out, logits) =
            self.mlp
                .forward(&self.post_attention_layernorm.forward(&h), mlp, unread);
        (h + out, logits)
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
    pub(crate) kind: Kind,
    pub(crate) device: Device,
    /// The embeddings' slice, when the base was loaded sharded (`--fsdp`).
    pub(crate) sharded_embedding: Option<Arc<ShardedWeight>>,
    /// The sharded base's gathers, once [`LlamaForCausalLM::start_fsdp`] ran.
    pub(crate) fsdp: Option<Fsdp>,
}

impl LlamaForCausalLM {
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
        let x = match &self.fsdp {
            None => Tensor::embedding(&self.model.embed_tokens, input_ids, -1, false, false),
            // Sharded (`--fsdp`): looked up where the rows lie.
            Some(f) => f.embed(input_ids),
        };
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
    /// With checkpointing, the layers run without an autograd graph and only
    /// their inputs are kept (and the frozen products [`KeptProducts`]
    /// names); the returned [`Recompute`] rebuilds each layer during the
    /// backward pass.
    pub fn decode(
        &self,
        input: &DecoderInput,
        mut cache: Option<&mut KvCache>,
        hooks: &mut dyn ForwardHooks,
        checkpointing: Checkpointing,
    ) -> DecoderOutput {
        let recompute = checkpointing.is_on();
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
        let mut kept = Vec::new();
        let mut router_logits = Vec::new();
        {
            let _no_grad = recompute.then(tch::no_grad_guard);
            for (i, mask) in layer_masks.iter().enumerate() {
                if recompute {
                    inputs.push(x.detach());
                }
                let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                let _whole = self.gather_layer(i, false);
                let keep = match checkpointing {
                    Checkpointing::On(keep) if keep != KeptProducts::default() => {
                        kept.push(LayerProducts::default());
                        Some((keep, kept.last_mut().expect("just pushed")))
                    }
                    _ => None,
                };
                let pass = LayerPass::Forward(slot, keep);
                let (out, logits) = self.run_layer(i, &x, &rope, mask.as_ref(), pass, &*hooks);
                router_logits.extend(logits);
                x = hooks.layer_output(i, out);
            }
        }
        if !recompute {
            return DecoderOutput {
                hidden: self.model.norm.forward(&x),
                recompute: None,
                router_logits,
            };
        }
        let top = x.detach().set_requires_grad(true);
        DecoderOutput {
            hidden: self.model.norm.forward(&top),
            recompute: Some(Recompute {
                inputs,
                kept,
                top,
                rope,
                masks: layer_masks,
            }),
            router_logits,
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
        pass: LayerPass,
        hooks: &dyn ForwardHooks,
    ) -> (Tensor, Option<Tensor>) {
        let layer = &self.model.layers[i];
        let rope = &rope[usize::from(layer.local_rope)];
        let (mut replayed_attention, mut replayed_mlp);
        let keep_or_compute = |keep: bool, list| match keep {
            true => Products::Kept(list),
            false => Products::Computed,
        };
        let (cache, mut attention, mut mlp, unread) = match pass {
            LayerPass::Forward(cache, None) => {
                (cache, Products::Computed, Products::Computed, false)
            }
            LayerPass::Forward(cache, Some((keep, kept))) => (
                cache,
                keep_or_compute(keep.attention, &mut kept.attention),
                keep_or_compute(keep.mlp, &mut kept.mlp),
                false,
            ),
            // Only backpropagated through: its output's value is needed
            // only where a hook reads it.
            LayerPass::Recompute(kept) => {
                replayed_attention = kept.attention.into_iter();
                replayed_mlp = kept.mlp.into_iter();
                let unread = !hooks.reads_layer_output(i);
                (
                    None,
                    Products::Replayed(&mut replayed_attention),
                    Products::Replayed(&mut replayed_mlp),
                    unread,
                )
            }
        };
        let run = || layer.forward(x, rope, mask, cache, &mut attention, &mut mlp, unread);
        match hooks.layer_seed(i) {
            Some(seed) => with_torch_seed(seed, run),
            None => run(),
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
        self.decode(input, cache, hooks, Checkpointing::Off).hidden
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
    /// Under `--fsdp` the head's unit must be gathered ([`Self::gather_head`]).
    pub fn plain_lm_head(&self) -> Option<(Tensor, Option<&Tensor>)> {
        if self.lm_head.adapter.is_some() || self.config.final_logit_softcapping.is_some() {
            return None;
        }
        match &self.lm_head.weight {
            FrozenWeight::Dense(w) => Some((w.shallow_clone(), self.lm_head.bias.as_ref())),
            FrozenWeight::Sharded(s) if !s.is_quantized() => Some((
                s.with_whole(FrozenWeight::dense),
                self.lm_head.bias.as_ref(),
            )),
            _ => None,
        }
    }

    /// Logits for every position of a right-padded batch `[batch, seq]`.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.logits(&self.forward_hidden(&DecoderInput::causal(input_ids), None, &mut NoHooks))
    }

    /// The linear modules layer `i` has (a sparse layer has no dense MLP).
    pub(crate) fn layer_linear_names(&self, i: usize) -> Vec<&'static str> {
        self.config
            .layer_linear_shapes_at(i)
            .iter()
            .map(|s| s.0)
            .collect()
    }

    /// Every parameter an adapter may target directly (the routers and
    /// experts of a mixture of experts), in the order of
    /// [`LlamaConfig::adaptable_parameters`], with its adapter slot.
    pub fn parameter_adapters(&self) -> Vec<(String, &Tensor, &Option<ParamLora>)> {
        let mut out = Vec::new();
        let router = self.config.moe.as_ref().map_or("gate", |m| m.router_name());
        let router_first = self.config.moe.as_ref().is_some_and(|m| m.router_first);
        for (i, l) in self.model.layers.iter().enumerate() {
            let m = format!("{}.layers.{i}.mlp", self.config.decoder_path);
            let first = out.len();
            if let Some(g) = &l.mlp.gate {
                out.push((format!("{m}.{router}.weight"), &g.weight, &g.lora));
            }
            if let Some(x) = &l.mlp.experts {
                out.push((
                    format!("{m}.experts.gate_up_proj"),
                    &x.gate_up_proj,
                    &x.gate_up_lora,
                ));
                out.push((format!("{m}.experts.down_proj"), &x.down_proj, &x.down_lora));
            }
            if !router_first && out.len() == first + 3 {
                out[first..].rotate_left(1);
            }
        }
        out
    }

    /// [`LlamaForCausalLM::parameter_adapters`], mutable.
    pub fn parameter_adapters_mut(&mut self) -> Vec<(String, &mut Tensor, &mut Option<ParamLora>)> {
        let mut out = Vec::new();
        let decoder = &self.config.decoder_path;
        let router = self.config.moe.as_ref().map_or("gate", |m| m.router_name());
        let router_first = self.config.moe.as_ref().is_some_and(|m| m.router_first);
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            let m = format!("{decoder}.layers.{i}.mlp");
            // In the order the sparse block registers them (PEFT's order).
            let first = out.len();
            if let Some(g) = l.mlp.gate.as_mut() {
                out.push((format!("{m}.{router}.weight"), &mut g.weight, &mut g.lora));
            }
            if let Some(x) = l.mlp.experts.as_mut() {
                let super::moe::Experts {
                    gate_up_proj,
                    down_proj,
                    gate_up_lora,
                    down_lora,
                    ..
                } = x;
                out.push((
                    format!("{m}.experts.gate_up_proj"),
                    gate_up_proj,
                    gate_up_lora,
                ));
                out.push((format!("{m}.experts.down_proj"), down_proj, down_lora));
            }
            if !router_first && out.len() == first + 3 {
                out[first..].rotate_left(1);
            }
        }
        out
    }

    /// Every linear layer with its Hugging Face module path, in model order
    /// (the order of [`LlamaConfig::linear_modules`]).
    pub fn linear_layers(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter().enumerate() {
            let names = self.layer_linear_names(i);
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
        let names: Vec<_> = (0..self.model.layers.len())
            .map(|i| self.layer_linear_names(i))
            .collect();
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            for (name, lin) in layer_linears!(l, mut) {
                let names = &names[i];
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

impl LlamaForCausalLM {
    /// Bytes held by the frozen weights (tied weights counted once), and of
    /// those the linear layers stored quantized: `(all bytes, quantized
    /// bytes, quantized parameters)`.
    pub fn frozen_bytes(&self) -> (usize, usize, i64) {
        let dense = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let mut all = dense(&self.model.embed_tokens) + dense(&self.model.norm.weight);
        // Sharded (`--fsdp`): this rank's slice, tied head included.
        all += self
            .sharded_embedding
            .as_ref()
            .map_or(0, |s| s.held_bytes());
        let (mut qbytes, mut qparams) = (0, 0);
        let mut count = |lin: &Linear, all: &mut usize| {
            let b = lin.weight.frozen_bytes();
            *all += b + lin.bias.as_ref().map_or(0, dense);
            if lin.weight.is_quantized() {
                qbytes += b;
                qparams += lin.weight.numel();
            }
        };
        for (i, l) in self.model.layers.iter().enumerate() {
            let names = self.layer_linear_names(i);
            for (name, lin) in layer_linears!(l) {
                if names.contains(&name) {
                    count(lin, &mut all);
                }
            }
            all += l.norms().map(|n| dense(&n.weight)).sum::<usize>();
            all += l.self_attn.sinks.as_ref().map_or(0, dense);
            all += l.mlp.sparse_tensors().map(dense).sum::<usize>();
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
        let mut n = v * h + h;
        for (i, l) in self.model.layers.iter().enumerate() {
            let names = self.layer_linear_names(i);
            n += l
                .mlp
                .sparse_tensors()
                .map(|t| t.numel() as i64)
                .sum::<i64>();
            n += layer_linears!(l)
                .iter()
                .filter(|(name, _)| names.contains(name))
                .map(|(_, lin)| numel(lin))
                .sum::<i64>();
            n += l.norms().map(|n| n.weight.numel() as i64).sum::<i64>();
            n += l.self_attn.sinks.as_ref().map_or(0, |s| s.numel() as i64);
        }
        if !c.tie_word_embeddings {
            n += v * h;
        }
        n
    }
}
