//! Training-time regularizers hooked into a model at named module paths.
//!
//! A regularizer says where it acts ([`HookPoint`], addressed by PEFT's module
//! paths such as `base_model.model.model.embed_tokens`) and is called there
//! with a [`HookContext`]: whether the model is training, the step, a seed for
//! its random draws, the attention mask (so per-example lengths are known) and
//! packed-segment ids. NEFTune ([`neftune::Neftune`]) is one implementation;
//! users write their own by implementing [`Regularizer`] — see
//! `examples/custom_regularizer.rs` in the repository.
//!
//! In evaluation and generation nothing is called unless a regularizer asks
//! for it with [`Regularizer::active_in_eval`].
#![warn(missing_docs)]

pub mod neftune;

pub use neftune::{Neftune, NeftuneMode, NoiseDistribution};

use tch::Tensor;

/// Where a regularizer is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// The output of the input-embedding module, `[batch, seq, hidden]`.
    EmbeddingOutput,
    /// The output of decoder layer `i`, `[batch, seq, hidden]`.
    DecoderLayerOutput(usize),
    /// The training loss (a scalar), after it is computed and before backward.
    Loss,
}

impl HookPoint {
    /// The module path in PEFT's naming (`base_model.model.` + the Hugging Face path).
    pub fn peft_path(&self) -> String {
        match self {
            HookPoint::EmbeddingOutput => "base_model.model.model.embed_tokens".to_owned(),
            HookPoint::DecoderLayerOutput(i) => format!("base_model.model.model.layers.{i}"),
            HookPoint::Loss => "loss".to_owned(),
        }
    }

    /// The point at a Hugging Face module path as the model reports it
    /// (`model.embed_tokens`, `model.layers.3`), if it is one.
    pub fn from_module_path(path: &str) -> Option<Self> {
        if path == "model.embed_tokens" {
            return Some(HookPoint::EmbeddingOutput);
        }
        path.strip_prefix("model.layers.")
            .and_then(|i| i.parse().ok())
            .map(HookPoint::DecoderLayerOutput)
    }

    /// A small number distinguishing points, mixed into seeds.
    pub fn salt(&self) -> u64 {
        match self {
            HookPoint::EmbeddingOutput => 1,
            HookPoint::Loss => 2,
            HookPoint::DecoderLayerOutput(i) => 1000 + *i as u64,
        }
    }
}

/// What a regularizer knows when it is called.
pub struct HookContext<'a> {
    /// True during a training forward pass; false in evaluation.
    pub training: bool,
    /// The optimizer step being computed (0-based).
    pub step: u64,
    /// `[batch, seq]`, 1 for real tokens and 0 for padding.
    pub attention_mask: &'a Tensor,
    /// `[batch, seq]` packed-segment ids where packing is on (0 on padding,
    /// 1, 2, ... for the examples packed into a row).
    pub segment_ids: Option<&'a Tensor>,
    /// Seed for this call's random draws, derived from the run seed, the
    /// step, the micro-batch and the hook point: the same seed gives the
    /// same noise, whatever ran before (a resumed run included).
    pub seed: u64,
    /// The trainable tensors (for penalties on adapter weights), by PEFT key.
    pub trainable: &'a [(String, Tensor)],
}

/// A training-time regularizer.
pub trait Regularizer: Send {
    /// A short name for logs and `training_args.json`.
    fn name(&self) -> String;
    /// The points where this regularizer wants to be called.
    fn hook_points(&self) -> Vec<HookPoint>;
    /// Called at each of [`Regularizer::hook_points`] with the activation (or
    /// the loss); returns the value the model continues with.
    fn apply(&mut self, point: HookPoint, value: Tensor, ctx: &HookContext) -> Tensor;
    /// Whether to be called in evaluation too (default: no).
    fn active_in_eval(&self) -> bool {
        false
    }
}

/// Several regularizers applied in the order given.
#[derive(Default)]
pub struct RegularizerStack {
    regs: Vec<Box<dyn Regularizer>>,
}

impl RegularizerStack {
    /// An empty stack.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a regularizer after those already present.
    pub fn push(&mut self, r: Box<dyn Regularizer>) {
        self.regs.push(r);
    }

    /// True when no regularizer is present.
    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    /// Names, in order.
    pub fn names(&self) -> Vec<String> {
        self.regs.iter().map(|r| r.name()).collect()
    }

    /// Whether any regularizer acts at `point` in this mode.
    pub fn wants(&self, point: HookPoint, training: bool) -> bool {
        self.regs
            .iter()
            .any(|r| (training || r.active_in_eval()) && r.hook_points().contains(&point))
    }

    /// Runs every regularizer that acts at `point`, in order. Each sees a seed
    /// derived from `ctx.seed`, the point and its position in the stack.
    pub fn apply(&mut self, point: HookPoint, mut value: Tensor, ctx: &HookContext) -> Tensor {
        for (i, r) in self.regs.iter_mut().enumerate() {
            if !(ctx.training || r.active_in_eval()) || !r.hook_points().contains(&point) {
                continue;
            }
            let seed = mix(mix(ctx.seed, point.salt()), i as u64);
            let own = HookContext { seed, ..*ctx };
            value = r.apply(point, value, &own);
        }
        value
    }
}

/// Mixes two numbers into a well-spread seed (SplitMix64's finaliser).
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(a << 6)
        .wrapping_add(a >> 2);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
