//! Training-time regularizers hooked into a model at named module paths.
//!
//! A regularizer says where it acts ([`HookPoint`]) and is called there with a
//! [`HookContext`] that tells it whether the model is training, the step, a
//! seeded generator and the attention mask. NEFTune is one implementation;
//! users write their own by implementing [`Regularizer`].

use tch::Tensor;

/// Where a regularizer is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookPoint {
    /// The output of the input-embedding module
    /// (`base_model.model.model.embed_tokens` in PEFT's naming).
    EmbeddingOutput,
    /// The output of decoder layer `i` (`base_model.model.model.layers.i`).
    DecoderLayerOutput(usize),
    /// The training loss, after it is computed and before backward.
    Loss,
}

/// What a regularizer knows when it is called.
pub struct HookContext<'a> {
    /// True during a training forward pass; false in evaluation and generation.
    pub training: bool,
    /// The optimizer step being computed (0-based).
    pub step: u64,
    /// `[batch, seq]`, 1 for real tokens and 0 for padding.
    pub attention_mask: &'a Tensor,
    /// `[batch, seq]` packed-segment ids where packing is on.
    pub segment_ids: Option<&'a Tensor>,
    /// A seed derived from the run seed and the step, so that noise is the same
    /// for the same seed whatever happened before (resume included).
    pub seed: u64,
}

/// A training-time regularizer.
pub trait Regularizer: Send {
    /// A short name for logs.
    fn name(&self) -> &str;
    /// The points where this regularizer wants to be called.
    fn hook_points(&self) -> Vec<HookPoint>;
    /// Called at each of [`Regularizer::hook_points`] with the activation (or
    /// the loss); returns the value the model continues with.
    fn apply(&mut self, point: &HookPoint, value: Tensor, ctx: &HookContext) -> Tensor;
}
