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
//!
//! The decoder calls down into this crate through [`hooks::ForwardHooks`];
//! [`stack::StackHooks`] runs a [`stack::RegularizerStack`] there. Regularizers
//! are chosen by name from flags and settings files through a
//! [`registry::Registry`], which a program built on peft-rs can extend with
//! its own.
#![warn(missing_docs)]

pub mod hidden_noise;
pub mod hooks;
pub mod neftune;
pub mod registry;
pub mod stack;

/// Random numbers (shared with the adapters, whose dropout draws them too).
pub use peft_adapters::rng;

pub use hidden_noise::HiddenNoise;
pub use hooks::{ForwardHooks, NoHooks};
pub use neftune::{Neftune, NeftuneMode, NoiseDistribution};
pub use registry::{Registry, RegularizerSpec};
pub use rng::{mix, with_torch_seed};
pub use stack::{RegularizerStack, StackHooks};

use tch::Tensor;

/// Where a regularizer is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// The output of the input-embedding module, `[batch, seq, hidden]`.
    EmbeddingOutput,
    /// The output of decoder layer `i`, `[batch, seq, hidden]`.
    DecoderLayerOutput(usize),
    /// The training loss of the whole optimizer step (a scalar: the mean
    /// over the step's label tokens, all micro-batches together), once per
    /// step. A term added here is backpropagated with its own gradient, so a
    /// penalty counts once per step whatever the gradient accumulation.
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
    /// One seed per row, for draws that belong to an example rather than to
    /// the batch (NEFTune's noise): derived from the run seed, the step and
    /// the example's place in the data set, so an example gets the same noise
    /// however the global batch is split over micro-batches or processes.
    /// `None` where rows have no identity (evaluation, hand-built batches):
    /// then draw from `seed`.
    pub row_seeds: Option<&'a [u64]>,
    /// Which micro-batch of the optimizer step this is (0-based). The
    /// [`HookPoint::Loss`] point is called once per optimizer step, after the
    /// last micro-batch, with the step's whole loss.
    pub micro_batch: usize,
    /// How many micro-batches this optimizer step has (gradient accumulation;
    /// the last step of an epoch may have fewer).
    pub micro_batches: usize,
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
    /// the loss); returns the value the model continues with, which the
    /// stack casts back to the activation's dtype and device.
    ///
    /// Random draws: the state of libtorch's generator on entry is
    /// unspecified. Draw only inside [`rng::with_torch_seed`]`(ctx.seed, ..)`
    /// (or from a [`rng::SplitMix64`] seeded with `ctx.seed`), so that what is
    /// drawn depends on the seed alone: a decoder-layer point is called again
    /// with the same context when gradient checkpointing recomputes the layer,
    /// and a resumed run must draw what the interrupted one would have.
    fn apply(&mut self, point: HookPoint, value: Tensor, ctx: &HookContext) -> Tensor;
    /// Whether to be called in evaluation too (default: no).
    fn active_in_eval(&self) -> bool {
        false
    }
}
