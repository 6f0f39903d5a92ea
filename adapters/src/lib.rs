//! Adapter methods for frozen linear layers.
//!
//! An adapter wraps one frozen linear layer `y = W x + b`. The model computes
//! the base output and hands it, with the layer's input and frozen weights, to
//! the adapter, which returns the adapted output. Models therefore know only
//! that a linear layer *may* carry an adapter, never which method it is — the
//! same split as PEFT's `LoraLayer` wrapping `base_layer`.
//!
//! [`lora`] holds LoRA with its rsLoRA and DoRA variants: the configuration
//! (`adapter_config.json`), the layer, and PEFT's file format; [`ia3`]
//! holds IA³, [`loha`] and [`lokr`] the LyCORIS methods on their shared
//! [`lycoris`] parts, [`vera`] VeRA. [`method`] reads an adapter directory's `peft_type` and
//! gives the configuration of its method.
#![warn(missing_docs)]

pub mod dtype;
pub mod ffi;
pub mod fsio;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris;
pub mod method;
pub mod peft_json;
pub mod rng;
pub mod text;
pub mod vera;

use std::cell::RefCell;

use anyhow::Result;
use tch::Tensor;

/// The input of one or more frozen linear layers that read the same tensor
/// (a decoder layer's `q_proj`, `k_proj` and `v_proj`; `gate_proj` and
/// `up_proj`), with what adapters have derived from it so far.
///
/// Adapters on layers given one `LayerInput` may share work on it: LoRA
/// layers that allow it share one dropout draw, so that one mask and one
/// dropped-out copy are made, and kept for backward, instead of one per layer.
pub struct LayerInput<'a> {
    x: &'a Tensor,
    derived: RefCell<Vec<(String, Tensor)>>,
}

impl<'a> LayerInput<'a> {
    /// The input `x`, `[..., in_features]`, with nothing derived yet.
    pub fn new(x: &'a Tensor) -> Self {
        Self {
            x,
            derived: RefCell::new(Vec::new()),
        }
    }

    /// The input itself.
    pub fn tensor(&self) -> &Tensor {
        self.x
    }

    /// The tensor derived from the input under `key`: made by `make` the
    /// first time it is asked for, the same tensor afterwards.
    pub fn derived(&self, key: &str, make: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        if let Some((_, t)) = self.derived.borrow().iter().find(|(k, _)| k == key) {
            return t.shallow_clone();
        }
        let t = make(self.x);
        self.derived
            .borrow_mut()
            .push((key.to_owned(), t.shallow_clone()));
        t
    }
}

/// The names of `names` that `held` says a layer holds, in order: what a
/// layer activates when asked for `names` (names it lacks are skipped).
pub fn held_names(names: &[String], held: impl Fn(&str) -> bool) -> Vec<String> {
    names.iter().filter(|n| held(n)).cloned().collect()
}

/// The frozen layer an adapter wraps.
pub struct BaseLinear<'a> {
    /// `W`, `[out_features, in_features]`, made when asked: a quantized
    /// base is dequantized only for the adapters that read it (DoRA).
    pub weight: &'a dyn Fn() -> Tensor,
    /// `b`, `[out_features]`.
    pub bias: Option<&'a Tensor>,
}

/// A method that changes the output of one frozen linear layer.
pub trait LinearAdapter: Send {
    /// Returns the adapted output of the layer, given its input `x`
    /// (`[..., in_features]`, maybe shared with other layers) and
    /// `base_output = x Wᵀ + b`, which the adapter owns and may change in place.
    fn forward(&self, x: &LayerInput, base_output: Tensor, base: &BaseLinear) -> Tensor;

    /// Whether [`LinearAdapter::forward`] adds terms that do not read
    /// `base_output`'s value to it (LoRA without DoRA), so that its gradient
    /// with respect to `x` is the same whatever that value is. A pass that
    /// only differentiates the layer (a recomputed layer's last projection
    /// under gradient checkpointing) then hands in zeros instead of
    /// computing `x Wᵀ`. The default says no: the base output is computed.
    fn ignores_base_output_value(&self) -> bool {
        false
    }

    /// The trainable tensors with their names in PEFT's file format
    /// (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`), for the
    /// active adapter(s).
    fn trainable_tensors(&self) -> Vec<(String, Tensor)>;

    /// Switches training-only behaviour (dropout) on or off.
    fn set_training(&mut self, training: bool);

    /// Whether the adapter may share a dropout draw with adapters on other
    /// layers that read the same [`LayerInput`] (default: yes). PEFT draws one
    /// mask per layer; sharing keeps the same expected value and dropout rate
    /// per layer, and saves a mask and a dropped copy of the input per layer.
    fn set_dropout_sharing(&mut self, _shared: bool) {}

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

    /// The input the frozen layer computes on instead of `x`, for methods
    /// that change it (IA³ on feed-forward modules rescales it); `None`
    /// leaves it as it is (the default).
    fn base_input(&self, _x: &Tensor) -> Option<Tensor> {
        None
    }

    /// Folds what [`LinearAdapter::merge`] will fold into the weight into the
    /// layer's `bias` too, for methods that scale the output (IA³); call it
    /// before `merge`. The default changes nothing.
    fn merge_bias(&self, _bias: &mut Tensor) -> Result<()> {
        Ok(())
    }

    /// Undoes [`LinearAdapter::merge_bias`]; call it before `unmerge`.
    fn unmerge_bias(&self, _bias: &mut Tensor) -> Result<()> {
        Ok(())
    }

    /// The tensors of the adapter `name` on this layer in PEFT's file
    /// format (its state dict), trained or not, active or not; empty when
    /// the layer has no adapter of that name.
    fn state_dict(&self, name: &str) -> Vec<(String, Tensor)>;

    /// Tensors of adapter `name` that every layer shares (VeRA's saved
    /// projections), under their names in PEFT's files after
    /// `base_model.`: saved once per adapter.
    fn shared_state(&self, _name: &str) -> Vec<(String, Tensor)> {
        Vec::new()
    }

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
