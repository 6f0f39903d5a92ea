//! Adapter methods for frozen linear layers.
//!
//! An adapter wraps one frozen linear layer `y = W x + b`. The model computes
//! the base output and hands it, with the layer's input and frozen weights, to
//! the adapter, which returns the adapted output. Models therefore know only
//! that a linear layer *may* carry an adapter, never which method it is — the
//! same split as PEFT's `LoraLayer` wrapping `base_layer`.
//!
//! [`lora`] holds LoRA with its rsLoRA and DoRA variants: the configuration
//! (`adapter_config.json`), the layer, and PEFT's file format.
#![warn(missing_docs)]

pub mod dtype;
pub mod fsio;
pub mod lora;
pub mod rng;

use anyhow::Result;
use tch::Tensor;

/// The frozen layer an adapter wraps.
pub struct BaseLinear<'a> {
    /// `W`, `[out_features, in_features]`.
    pub weight: &'a Tensor,
    /// `b`, `[out_features]`.
    pub bias: Option<&'a Tensor>,
}

/// A method that changes the output of one frozen linear layer.
pub trait LinearAdapter: Send {
    /// Returns the adapted output of the layer, given its input `x`
    /// (`[..., in_features]`) and `base_output = x Wᵀ + b`.
    fn forward(&self, x: &Tensor, base_output: Tensor, base: &BaseLinear) -> Tensor;

    /// The trainable tensors with their names in PEFT's file format
    /// (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`), for the
    /// active adapter(s).
    fn trainable_tensors(&self) -> Vec<(String, Tensor)>;

    /// Switches training-only behaviour (dropout) on or off.
    fn set_training(&mut self, training: bool);

    /// The dtype the adapter's matmuls run in: fp32 (PEFT in eager mode casts
    /// the input to the adapter's fp32 weights) or the base's 16-bit dtype (as
    /// under transformers' bf16 autocast). Parameters stay fp32 either way.
    /// Methods without such a choice ignore it.
    fn set_compute_kind(&mut self, _kind: tch::Kind) {}

    /// Folds the active adapter(s) into `weight` (computed in fp32, then cast
    /// to the weight's dtype); after this, `forward` adds nothing.
    fn merge(&mut self, weight: &mut Tensor) -> Result<()>;

    /// Undoes [`LinearAdapter::merge`], restoring `weight` within fp32 rounding.
    fn unmerge(&mut self, weight: &mut Tensor) -> Result<()>;

    /// The tensors of the adapter `name` on this layer in PEFT's file
    /// format (its state dict), trained or not, active or not; empty when
    /// the layer has no adapter of that name.
    fn state_dict(&self, name: &str) -> Vec<(String, Tensor)>;

    /// Chooses which of the layer's adapters are summed in the forward pass
    /// (names the layer does not have are skipped).
    fn set_active(&mut self, names: &[String]);

    /// Adds another named LoRA adapter, inactive until [`LinearAdapter::set_active`].
    /// A method that cannot hold LoRA weights refuses.
    fn add_lora(&mut self, name: &str, _weights: lora::LoraWeights) -> Result<()> {
        anyhow::bail!(
            "the layer already carries an adapter of another method; cannot add LoRA adapter `{name}`"
        )
    }

    /// Adds adapter `new_name`, the combination of the layer's adapters
    /// `names` with one weight each (PEFT's `add_weighted_adapter`); names
    /// the layer lacks are skipped, and nothing is added when none is there.
    fn add_weighted(
        &mut self,
        names: &[String],
        weights: &[f64],
        new_name: &str,
        _combination: lora::Combination,
    ) -> Result<()> {
        let _ = (names, weights);
        anyhow::bail!("this adapter method cannot combine adapters into `{new_name}`")
    }
}
