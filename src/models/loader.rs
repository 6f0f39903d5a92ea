//! Loading a decoder: a walk over Hugging Face tensor names
//! (`w.pp("model").pp("layers.0")` addresses `model.layers.0.*`), every tensor
//! taken recorded so that leftovers can be reported, and every shape checked
//! against the configuration.

use std::cell::RefCell;
use std::collections::BTreeSet;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::attention::Attention;
use super::config::{ExpertStyle, LlamaConfig, MoeConfig};
use super::decoder::{layer_linears, DecoderLayer, LlamaForCausalLM, LlamaModel};
use super::mlp::Mlp;
use super::moe::{Experts, TopKRouter};
use super::rope::RotaryEmbedding;
use crate::dist::fsdp::{self, ShardedWeight};
use crate::nn::{Linear, RmsNorm};
use crate::quant::{FrozenWeight, QuantPlan};
use crate::weights::WeightFiles;
use std::sync::Arc;

/// Where a model's tensors come from: a checkpoint, or random values for
/// benchmarks of shapes no checkpoint is at hand for.
pub trait TensorSource {
    /// The tensor `name` of `shape`, in `kind` on `device`.
    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor>;

    /// The checkpoint files, when the tensors come from some (pre-quantized
    /// layers are read from them directly).
    fn weight_files(&self) -> Option<&WeightFiles> {
        None
    }

    /// Elements `run` of the flattened tensor `name` of `shape`: a rank's
    /// slice under `--fsdp` (a checkpoint reads only those bytes).
    fn tensor_run(
        &self,
        name: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
        run: std::ops::Range<i64>,
    ) -> Result<Tensor> {
        let whole = self.tensor(name, shape, kind, device)?.reshape([-1]);
        Ok(whole.narrow(0, run.start, run.end - run.start).contiguous())
    }

    /// Whether the source holds the tensor `name` (random weights hold any).
    fn contains(&self, name: &str) -> bool {
        let _ = name;
        true
    }
}

impl TensorSource for WeightFiles {
    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        self.load(name, shape, kind, device)
    }

    fn weight_files(&self) -> Option<&WeightFiles> {
        Some(self)
    }

    fn tensor_run(
        &self,
        name: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
        run: std::ops::Range<i64>,
    ) -> Result<Tensor> {
        self.load_run(name, shape, kind, device, run)
    }

    fn contains(&self, name: &str) -> bool {
        WeightFiles::contains(self, name)
    }
}

/// Random weights with a model's shapes: norms at 1, everything else
/// N(0, `std`), drawn on the device (a 7B model in seconds, nothing read).
pub struct RandomWeights {
    /// Standard deviation of the non-norm weights.
    pub std: f64,
}

impl TensorSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let t = if name.contains("norm") {
            Tensor::f_ones(shape, (kind, device))?
        } else {
            Tensor::f_empty(shape, (kind, device))?.f_normal_(0.0, self.std)?
        };
        Ok(t)
    }
}

/// A view of a checkpoint under a name prefix, loading in one dtype on one device.
pub struct Weights<'a> {
    files: &'a dyn TensorSource,
    prefix: String,
    kind: Kind,
    device: Device,
    used: &'a RefCell<BTreeSet<String>>,
    quant: Option<&'a QuantPlan>,
    /// `(rank, world)`: keep only this rank's slice of each frozen weight (`--fsdp`).
    shard: Option<(usize, usize)>,
}

impl<'a> Weights<'a> {
    /// The root of a checkpoint; `used` collects the names loaded.
    pub fn new(
        files: &'a dyn TensorSource,
        kind: Kind,
        device: Device,
        used: &'a RefCell<BTreeSet<String>>,
    ) -> Self {
        Self {
            files,
            prefix: String::new(),
            kind,
            device,
            used,
            quant: None,
            shard: None,
        }
    }

    /// The same root, keeping only `rank`'s slice of every linear layer's
    /// weight and of the embeddings (see [`crate::dist::fsdp`]).
    pub fn sharded(mut self, rank: usize, world: usize) -> Self {
        self.shard = Some((rank, world));
        self
    }

    /// The same root, loading linear layers as `plan` says (quantized at
    /// load, or read pre-quantized).
    pub fn with_quantization(mut self, plan: Option<&'a QuantPlan>) -> Self {
        self.quant = plan;
        self
    }

    /// The view under `self.prefix + name + "."`.
    pub fn pp(&self, name: &str) -> Weights<'a> {
        Weights {
            files: self.files,
            prefix: self.path(name) + ".",
            kind: self.kind,
            device: self.device,
            used: self.used,
            quant: self.quant,
            shard: self.shard,
        }
    }

    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The dtype tensors are loaded in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device tensors are loaded on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Whether the checkpoint holds `prefix + name`.
    pub fn contains(&self, name: &str) -> bool {
        self.files.contains(&self.path(name))
    }

    /// Loads `prefix + name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let full = self.path(name);
        let t = self.files.tensor(&full, shape, self.kind, self.device)?;
        self.used.borrow_mut().insert(full);
        Ok(t)
    }

    /// [`Weights::get`] for a frozen weight, which is only read: it may be
    /// the checkpoint's bytes in place ([`WeightFiles::load_in_place`]).
    pub fn get_frozen(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let full = self.path(name);
        let (kind, device) = (self.kind, self.device);
        let t = match self.files.weight_files() {
            Some(files) => files.load_in_place(&full, shape, kind, device)?,
            None => self.files.tensor(&full, shape, kind, device)?,
        };
        self.used.borrow_mut().insert(full);
        Ok(t)
    }

    /// Loads `prefix + name` in `kind` rather than the model's dtype.
    pub fn get_kind(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let full = self.path(name);
        let t = self.files.tensor(&full, shape, kind, self.device)?;
        self.used.borrow_mut().insert(full);
        Ok(t)
    }

    /// The tensor-name prefix of this view (`model.layers.3.`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Loads the linear layer `prefix + name` (`.weight`, and `.bias` when `bias`).
    pub fn linear(&self, name: &str, in_dim: i64, out_dim: i64, bias: bool) -> Result<Linear> {
        let w = self.pp(name);
        let path = self.path(name);
        let weight = match self.quant {
            Some(plan) if plan.quantizes(&path)? => {
                let (weight, used) = plan.weight(
                    &path,
                    &[out_dim, in_dim],
                    self.files.weight_files(),
                    || w.get("weight", &[out_dim, in_dim]),
                    self.kind,
                    self.device,
                )?;
                self.used.borrow_mut().extend(used);
                weight
            }
            _ => match self.shard {
                Some(_) => return self.sharded_linear(name, in_dim, out_dim, bias),
                None => FrozenWeight::Dense(w.get_frozen("weight", &[out_dim, in_dim])?),
            },
        };
        let weight = match self.shard {
            Some((rank, world)) => {
                FrozenWeight::Sharded(ShardedWeight::from_whole(&weight, rank, world))
            }
            None => weight,
        };
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Linear::with_weight(weight, bias))
    }
}

impl Weights<'_> {
    /// This rank's slice of the dense tensor `prefix + name` of `shape`,
    /// read alone, as a sharded weight.
    fn sharded_dense(&self, name: &str, shape: &[i64]) -> Result<Arc<ShardedWeight>> {
        let (rank, world) = self.shard.expect("called when sharding");
        let full = self.path(name);
        let numel = shape.iter().product();
        let row = fsdp::row_of(shape);
        let run = fsdp::run_of(numel, rank, world, row);
        let t = self
            .files
            .tensor_run(&full, shape, self.kind, self.device, run)?;
        self.used.borrow_mut().insert(full);
        // Only the shape and dtype of the whole are read from this stand-in.
        let stand_in = Tensor::zeros([1, 1], (self.kind, tch::Device::Cpu)).expand(shape, false);
        let run = fsdp::pad_run(&t, fsdp::run_len(numel, world, row));
        Ok(ShardedWeight::from_runs(
            &FrozenWeight::Dense(stand_in),
            vec![run],
        ))
    }

    fn sharded_linear(&self, name: &str, in_dim: i64, out_dim: i64, bias: bool) -> Result<Linear> {
        let w = self.pp(name);
        let weight = w.sharded_dense("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Linear::with_weight(FrozenWeight::Sharded(weight), bias))
    }
}

impl LlamaForCausalLM {
    /// Builds the model from checkpoint tensors, checking every shape against the config.
    pub fn load(config: LlamaConfig, w: &Weights) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size as i64;
        let m = w.pp(&c.stored_decoder);
        let embed_shape = [c.vocab_size as i64, h];
        let (embed_tokens, sharded_embedding) = match w.shard {
            None => (m.get_frozen("embed_tokens.weight", &embed_shape)?, None),
            Some(_) => {
                let s = m.sharded_dense("embed_tokens.weight", &embed_shape)?;
                (Tensor::empty([0], (w.kind(), w.device())), Some(s))
            }
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for (i, window) in c.sliding_window.iter().enumerate() {
            layers.push(load_layer(c, i, &m.pp(&format!("layers.{i}")), *window)?);
        }
        let lm_head = if c.tie_word_embeddings {
            match &sharded_embedding {
                Some(s) => Linear::with_weight(FrozenWeight::Sharded(s.clone()), None),
                None => Linear::new(embed_tokens.shallow_clone(), None),
            }
        } else {
            w.linear(&c.stored_head, h, c.vocab_size as i64, false)?
        };
        let model = LlamaModel {
            embed_tokens,
            layers,
            norm: rms_norm(c, &m, "norm", h)?,
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
            sharded_embedding,
            fsdp: None,
        })
    }
}

/// The RMS norm `name` of width `width`; Gemma's stored `w` becomes `1 + w`
/// in fp32 once here, as its forward computes it each time; gpt-oss's
/// weight stays fp32 (transformers keeps those norms in fp32).
fn rms_norm(c: &LlamaConfig, w: &Weights, name: &str, width: i64) -> Result<RmsNorm> {
    let weight = if c.fp32_norms {
        w.get_kind(&format!("{name}.weight"), &[width], Kind::Float)?
    } else {
        w.get(&format!("{name}.weight"), &[width])?
    };
    Ok(RmsNorm {
        weight: if c.gemma_norms {
            weight.to_kind(Kind::Float) + 1.0
        } else {
            weight
        },
        eps: c.rms_norm_eps,
        scale_in_fp32: c.gemma_norms || c.fp32_norms,
    })
}

/// Decoder layer `i` (`l`, `model.layers.N`), with a sliding `window` or none:
/// its norms, its linear modules checked against
/// [`LlamaConfig::layer_linear_shapes_at`], and its experts if it has them.
fn load_layer(
    c: &LlamaConfig,
    i: usize,
    l: &Weights,
    window: Option<usize>,
) -> Result<DecoderLayer> {
    let h = c.hidden_size as i64;
    let hd = c.head_dim as i64;
    let norm = |name: &str| rms_norm(c, l, name, h);
    let optional = |on: bool, w: &Weights, name: &str, width: i64| {
        on.then(|| rms_norm(c, w, name, width)).transpose()
    };
    let attn = l.pp("self_attn");
    let empty = || Linear::new(Tensor::new(), None);
    let mut layer = DecoderLayer {
        self_attn: Attention {
            q_proj: empty(),
            k_proj: empty(),
            v_proj: empty(),
            o_proj: empty(),
            qkv_proj: empty(),
            q_norm: optional(c.qk_norm, &attn, "q_norm", hd)?,
            k_norm: optional(c.qk_norm, &attn, "k_norm", hd)?,
            sinks: c
                .attention_sinks
                .then(|| attn.get("sinks", &[c.num_attention_heads as i64]))
                .transpose()?,
            num_heads: c.num_attention_heads as i64,
            num_kv_heads: c.num_key_value_heads as i64,
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
            gate: None,
            experts: None,
            act: c.hidden_act,
            fused: c.fused_projections,
        },
        input_layernorm: norm("input_layernorm")?,
        post_attention_layernorm: norm("post_attention_layernorm")?,
        pre_feedforward_layernorm: optional(c.sandwich_norms, l, "pre_feedforward_layernorm", h)?,
        post_feedforward_layernorm: optional(c.sandwich_norms, l, "post_feedforward_layernorm", h)?,
        local_rope: c.local_rope.is_some() && window.is_some(),
    };
    if let (true, Some(moe)) = (c.is_sparse(i), &c.moe) {
        let (gate, experts) = load_experts(c, moe, l)?;
        layer.mlp.gate = Some(gate);
        layer.mlp.experts = Some(experts);
    }
    let shapes = c.layer_linear_shapes_at(i);
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
    Ok(layer)
}

/// A sparse layer's router and experts, from either layout: transformers
/// 5's fused 3D tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`,
/// `mlp.gate.weight`), or the Hub's tensors per expert (`mlp.experts.N.
/// gate_proj.weight`, Mixtral's `block_sparse_moe.experts.N.w1.weight`, ...),
/// copied one by one into the stacked tensors so that no second copy of
/// the experts is ever held.
fn load_experts(c: &LlamaConfig, moe: &MoeConfig, l: &Weights) -> Result<(TopKRouter, Experts)> {
    let (e, h, i) = (
        moe.num_experts as i64,
        c.hidden_size as i64,
        moe.moe_intermediate_size as i64,
    );
    if let ExpertStyle::GptOss { .. } = moe.style {
        return load_gpt_oss_experts(moe, h, i, l);
    }
    let (block, gate_name, up_name, down_name) = moe.per_expert_names;
    let fused = l.pp("mlp");
    let (router, gate_up_proj, down_proj) = if l.contains("mlp.experts.gate_up_proj")
        || !l.contains(&format!("{block}.experts.0.{gate_name}.weight"))
    {
        (
            fused.get("gate.weight", &[e, h])?,
            fused.get("experts.gate_up_proj", &[e, 2 * i, h])?,
            fused.get("experts.down_proj", &[e, h, i])?,
        )
    } else {
        let b = l.pp(block);
        let gate_up = Tensor::f_empty([e, 2 * i, h], (l.kind(), l.device()))?;
        let down = Tensor::f_empty([e, h, i], (l.kind(), l.device()))?;
        for x in 0..e {
            let ex = b.pp(&format!("experts.{x}"));
            let slot = gate_up.get(x);
            slot.narrow(0, 0, i)
                .f_copy_(&ex.get(&format!("{gate_name}.weight"), &[i, h])?)?;
            slot.narrow(0, i, i)
                .f_copy_(&ex.get(&format!("{up_name}.weight"), &[i, h])?)?;
            down.get(x)
                .f_copy_(&ex.get(&format!("{down_name}.weight"), &[h, i])?)?;
        }
        (b.get("gate.weight", &[e, h])?, gate_up, down)
    };
    let gate = TopKRouter {
        weight: router,
        bias: None,
        style: moe.style,
        top_k: moe.num_experts_per_tok as i64,
        norm_topk_prob: moe.norm_topk_prob,
        weights_in_model_dtype: moe.routing_weights_in_model_dtype,
        lora: None,
    };
    Ok((
        gate,
        Experts {
            gate_up_proj,
            down_proj,
            gate_up_proj_bias: None,
            down_proj_bias: None,
            style: moe.style,
            gate_up_lora: None,
            down_lora: None,
        },
    ))
}

/// gpt-oss's router (`mlp.router`, with a bias) and experts, stored as the
/// module holds them: `[experts, in, out]` with biases. A checkpoint with
/// MXFP4 experts (`gate_up_proj_blocks`) is refused by name.
fn load_gpt_oss_experts(
    moe: &MoeConfig,
    h: i64,
    i: i64,
    l: &Weights,
) -> Result<(TopKRouter, Experts)> {
    let e = moe.num_experts as i64;
    if l.contains("mlp.experts.gate_up_proj_blocks") && !l.contains("mlp.experts.gate_up_proj") {
        bail!(
            "{}: the experts are stored in MXFP4 (`mlp.experts.gate_up_proj_blocks`), which peft-rs does \
             not read; use a bf16 copy of the model (transformers writes one with \
             `Mxfp4Config(dequantize=True)` and `save_pretrained`)",
            l.prefix()
        );
    }
    let m = l.pp("mlp");
    let gate = TopKRouter {
        weight: m.get("router.weight", &[e, h])?,
        bias: Some(m.get("router.bias", &[e])?),
        style: moe.style,
        top_k: moe.num_experts_per_tok as i64,
        norm_topk_prob: false,
        weights_in_model_dtype: true,
        lora: None,
    };
    let experts = Experts {
        gate_up_proj: m.get("experts.gate_up_proj", &[e, h, 2 * i])?,
        down_proj: m.get("experts.down_proj", &[e, i, h])?,
        gate_up_proj_bias: Some(m.get("experts.gate_up_proj_bias", &[e, 2 * i])?),
        down_proj_bias: Some(m.get("experts.down_proj_bias", &[e, h])?),
        style: moe.style,
        gate_up_lora: None,
        down_lora: None,
    };
    Ok((gate, experts))
}
