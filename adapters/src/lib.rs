//! Adapter methods for frozen linear layers.
//!
//! An adapter wraps one frozen linear layer `y = W x + b`. The model computes
//! the base output and hands it, with the layer's input and weight, to the
//! adapter, which returns the adapted output. Models therefore know only that a
//! linear layer *may* carry an adapter, never which method it is — the same
//! split as PEFT's `LoraLayer` wrapping `base_layer`.

use tch::Tensor;

/// A method that changes the output of one frozen linear layer.
pub trait LinearAdapter: Send {
    /// Returns the adapted output of the layer.
    ///
    /// * `x`: the layer's input, `[..., in_features]`;
    /// * `base_output`: `x Wᵀ + b`, `[..., out_features]`;
    /// * `weight`: the frozen `W`, `[out_features, in_features]` (DoRA needs it).
    fn forward(&self, x: &Tensor, base_output: Tensor, weight: &Tensor) -> Tensor;

    /// The trainable tensors, named by their suffix in PEFT's file format
    /// (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`).
    fn trainable_tensors(&self) -> Vec<(String, Tensor)>;

    /// Switches training-only behaviour (dropout) on or off.
    fn set_training(&mut self, training: bool);
}
