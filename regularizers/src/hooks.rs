//! The points of a decoder's forward pass where activations may be changed,
//! as a trait the decoder calls: the model calls down into this crate and
//! never knows which regularizers, if any, answer.

use tch::Tensor;

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
    /// Whether [`ForwardHooks::layer_output`] may read the value of layer
    /// `i`'s output (do anything but return it unchanged). Where it does
    /// not, a layer recomputed under gradient checkpointing, which exists
    /// only to be backpropagated through, need not compute that value. The
    /// default says it may.
    fn reads_layer_output(&self, _i: usize) -> bool {
        true
    }
    /// The seed of layer `i`'s random draws (adapter dropout). With one, the
    /// layer runs inside [`crate::rng::with_torch_seed`], so a recomputed
    /// layer (gradient checkpointing) draws the same masks.
    fn layer_seed(&self, _i: usize) -> Option<u64> {
        None
    }
}

/// No hooks.
pub struct NoHooks;

impl ForwardHooks for NoHooks {
    fn reads_layer_output(&self, _i: usize) -> bool {
        false
    }
}
