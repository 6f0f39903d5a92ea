//! The building blocks the model files share: a frozen linear layer that may
//! carry an adapter (its weight dense or quantized, see
//! [`crate::quant::FrozenWeight`]) and an RMS norm. The points where
//! activations may be changed are [`peft_regularizers::hooks`].

use peft_adapters::{BaseLinear, LayerInput, LinearAdapter};
use tch::Tensor;

use crate::quant::FrozenWeight;

/// A frozen `y = x Wᵀ + b` whose output an adapter may change.
///
/// The model code calls [`Linear::forward`] and never knows whether, or which,
/// adapter is attached, nor whether the weight is quantized: adapters wrap the
/// layer the way PEFT's `LoraLayer` wraps `base_layer`.
pub struct Linear {
    /// `[out_features, in_features]`, dense or quantized; never requires grad.
    pub weight: FrozenWeight,
    /// `[out_features]`, never requires grad.
    pub bias: Option<Tensor>,
    /// The adapter wrapping this layer, if any.
    pub adapter: Option<Box<dyn LinearAdapter>>,
}

impl Linear {
    /// A dense layer without adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_weight(FrozenWeight::Dense(weight), bias)
    }

    /// A layer without adapter holding `weight`.
    pub fn with_weight(weight: FrozenWeight, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
        }
    }

    /// `[in_features]` and `[out_features]`.
    pub fn dims(&self) -> (i64, i64) {
        let s = self.weight.size();
        (s[1], s[0])
    }

    /// Base output plus whatever the attached adapter adds.
    ///
    /// A quantized weight is dequantized here into the compute dtype and the
    /// input cast to it, as bitsandbytes' `Linear4bit.forward` does; the
    /// result is cast back to the input's dtype. The dequantized weight is a
    /// temporary: autograd keeps it for the input gradient only while this
    /// layer's graph lives (one layer at a time with gradient checkpointing).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let [y] = forward_same_input([self], x);
        y
    }

    /// The layer in a pass that differentiates its output but never reads
    /// its value (the last projection of a layer recomputed under gradient
    /// checkpointing): the frozen product `x Wᵀ` is left out where the
    /// adapter's gradient does not depend on it (LoRA, no adapter; not
    /// DoRA, IA³ or a 4-bit weight), so the value returned is only the
    /// adapter's part. Gradients are those of [`Linear::forward`].
    pub fn forward_unread(&self, x: &Tensor) -> Tensor {
        let [y] = forward_rows_of([self], x, [Product::Unread]);
        y
    }

    /// The layer on a `[tokens, in_features]` input shared with other
    /// layers; what becomes of its frozen product is `product`'s.
    fn forward_rows(&self, input: &LayerInput, product: Product<'_>) -> Tensor {
        // IA³ on a feed-forward module rescales what the frozen layer reads.
        let rescaled = self
            .adapter
            .as_ref()
            .and_then(|a| a.base_input(input.tensor()));
        let x = rescaled.as_ref().unwrap_or(input.tensor());
        let dense = match &self.weight {
            FrozenWeight::Dense(w) => Some(w),
            _ => None,
        };
        let value_unused = rescaled.is_none()
            && self
                .adapter
                .as_ref()
                .is_none_or(|a| a.ignores_base_output_value());
        let mut keep = None;
        let skipped = match (product, dense) {
            (Product::Unread, Some(w)) if value_unused => crate::unread_linear::unread_linear(x, w),
            (Product::Replayed(Some(value)), Some(w)) => {
                crate::unread_linear::replayed_linear(x, w, value)
            }
            (Product::Kept(slot), Some(_)) => {
                keep = Some(slot);
                None
            }
            _ => None,
        };
        let base = skipped.unwrap_or_else(|| self.frozen_product(x));
        if let Some(slot) = keep {
            // An adapter may add into an fp32 product in place (LoRA's fp32
            // sum): what is kept must not change, so it is copied then.
            let in_place = base.kind() == tch::Kind::Float && self.adapter.is_some();
            *slot = Some(if in_place {
                base.copy()
            } else {
                base.shallow_clone()
            });
        }
        match &self.adapter {
            None => base,
            // The dense weight is made only for adapters that read it (DoRA).
            Some(adapter) => adapter.forward(
                input,
                base,
                &BaseLinear {
                    weight: &|| self.weight.dense(),
                    bias: self.bias.as_ref(),
                },
            ),
        }
    }

    /// `x Wᵀ + b`; a quantized weight dequantized into its compute dtype,
    /// the result cast back to `x`'s.
    fn frozen_product(&self, x: &Tensor) -> Tensor {
        match &self.weight {
            FrozenWeight::Dense(w) => x.linear(w, self.bias.as_ref()),
            q => {
                let compute = q.compute_kind();
                let bias = self.bias.as_ref().map(|b| b.to_kind(compute));
                q.linear(&x.to_kind(compute), bias.as_ref())
                    .to_kind(x.kind())
            }
        }
    }
}

/// What one pass does with a layer's frozen product `x Wᵀ + b`.
enum Product<'a> {
    /// Computes it.
    Computed,
    /// Leaves it out where nothing reads its value ([`Linear::forward_unread`]).
    Unread,
    /// Computes it and keeps it in the slot (a dense weight only).
    Kept(&'a mut Option<Tensor>),
    /// Uses the one kept by an earlier pass over the same input, if any.
    Replayed(Option<Tensor>),
}

/// What a pass does with the frozen products of layers that read one
/// input, under gradient checkpointing that keeps them (see
/// [`forward_same_input_with`]).
pub enum Products<'a> {
    /// Computes them (every ordinary pass).
    Computed,
    /// The forward pass, without a graph: computes them and appends each
    /// layer's to the list (`None` for a quantized weight, which is not kept).
    Kept(&'a mut Vec<Option<Tensor>>),
    /// The recompute: takes each layer's from the list the forward pass
    /// filled, in order, and computes those it did not keep. The backward
    /// pass gives the input the gradient it would have (`dy W`).
    Replayed(&'a mut std::vec::IntoIter<Option<Tensor>>),
}

/// The outputs of linear layers that read the same input `x` (`[..., in]`):
/// a decoder layer's query, key and value projections, or its gate and up
/// projections. Adapters on them may share work on the input (one LoRA
/// dropout draw instead of one per layer).
///
/// Layers compute on `x` seen as `[tokens, in]`, so that adapters can add
/// their output into the base output's storage (a view would make autograd
/// copy the whole gradient in backward).
pub fn forward_same_input<const N: usize>(layers: [&Linear; N], x: &Tensor) -> [Tensor; N] {
    forward_same_input_with(layers, x, &mut Products::Computed)
}

/// [`forward_same_input`], the frozen products kept or replayed as
/// `products` says: a recompute that replays what its forward pass kept
/// gives the outputs and every gradient of [`forward_same_input`] without
/// multiplying by the weights again.
pub fn forward_same_input_with<const N: usize>(
    layers: [&Linear; N],
    x: &Tensor,
    products: &mut Products<'_>,
) -> [Tensor; N] {
    match products {
        Products::Computed => {
            forward_rows_of(layers, x, std::array::from_fn(|_| Product::Computed))
        }
        Products::Kept(list) => {
            let mut kept: [Option<Tensor>; N] = std::array::from_fn(|_| None);
            let mut slots = kept.iter_mut();
            let each = std::array::from_fn(|_| Product::Kept(slots.next().expect("N slots")));
            let ys = forward_rows_of(layers, x, each);
            list.extend(kept);
            ys
        }
        Products::Replayed(kept) => forward_rows_of(
            layers,
            x,
            std::array::from_fn(|_| Product::Replayed(kept.next().flatten())),
        ),
    }
}

/// Each layer's output on `x` seen as `[tokens, in]`, reshaped back; its
/// frozen product as `products` says.
fn forward_rows_of<const N: usize>(
    layers: [&Linear; N],
    x: &Tensor,
    products: [Product<'_>; N],
) -> [Tensor; N] {
    let size = x.size();
    let inner = size.last().copied().unwrap_or(1);
    let rows = x.reshape([-1, inner]);
    let input = LayerInput::new(&rows);
    let mut products = products.into_iter();
    layers.map(|layer| {
        let product = products.next().expect("one per layer");
        let y = layer.forward_rows(&input, product);
        let mut out = size.clone();
        if let (Some(last), Some(&o)) = (out.last_mut(), y.size().last()) {
            *last = o;
        }
        y.reshape(out.as_slice())
    })
}

/// Root-mean-square layer norm computed as transformers' `LlamaRMSNorm` does
/// (in fp32, then cast back before the weight is applied), or, with
/// `scale_in_fp32`, as `Gemma3RMSNorm` does (the weight applied in fp32,
/// then cast back).
pub struct RmsNorm {
    /// `[hidden_size]`; for Gemma's norms `1 + w` in fp32, computed once at load.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
    /// Multiply by the weight before casting back (Gemma), not after (Llama).
    pub scale_in_fp32: bool,
}

impl RmsNorm {
    /// Normalises over the last dimension: fused on the CPU
    /// ([`crate::fused_norm`]), as ATen ops elsewhere.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        crate::fused_norm::rms_norm(x, &self.weight, self.eps, self.scale_in_fp32)
            .unwrap_or_else(|| self.forward_aten(x))
    }

    /// The norm as transformers writes it, in ATen ops.
    pub fn forward_aten(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(tch::Kind::Float);
        let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, tch::Kind::Float);
        let h = h * (variance + self.eps).rsqrt();
        if self.scale_in_fp32 {
            (h * &self.weight).to_kind(kind)
        } else {
            &self.weight * h.to_kind(kind)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_adapters::lora::layer::{LoraLayer, LoraWeights};
    use tch::{Device, Kind};

    /// `layer`'s output on `x` and the gradient of `<output, g>` for `x` and
    /// for every trainable tensor, as [`Linear::forward`] or
    /// [`Linear::forward_unread`] computes them.
    fn run(layer: &Linear, x: &Tensor, g: &Tensor, unread: bool) -> (Tensor, Vec<Tensor>) {
        let x = x.detach().set_requires_grad(true);
        let y = if unread {
            layer.forward_unread(&x)
        } else {
            layer.forward(&x)
        };
        (&y.to_kind(Kind::Float) * g).sum(Kind::Float).backward();
        let mut grads = vec![x.grad()];
        if let Some(a) = &layer.adapter {
            grads.extend(a.trainable_tensors().iter().map(|(_, t)| t.grad()));
        }
        (y.detach(), grads)
    }

    fn lora(w: &Tensor, dora: bool, kind: Kind) -> Box<dyn LinearAdapter> {
        // Random: B is not zero, so the adapter's part of the output is not either.
        let init = peft_adapters::lora::config::InitLoraWeights::Random;
        let weights = LoraWeights::init(w, 4, 2.0, 0.0, init, dora, Device::Cpu);
        let mut layer = LoraLayer::new("default", weights);
        layer.set_compute_kind(kind);
        for (_, t) in layer.trainable_tensors() {
            let _ = t.set_requires_grad(true);
        }
        Box::new(layer)
    }

    #[test]
    fn an_unread_layer_skips_the_frozen_product_and_keeps_every_gradient() {
        if !crate::unread_linear::AVAILABLE {
            return;
        }
        tch::manual_seed(5);
        for kind in [Kind::Float, Kind::BFloat16] {
            let opts = (kind, Device::Cpu);
            let w = Tensor::randn([12, 8], opts);
            let bias = Tensor::randn([12], opts);
            let x = Tensor::randn([3, 4, 8], opts);
            let g = Tensor::randn([3, 4, 12], (Kind::Float, Device::Cpu));
            let frozen = x.linear(&w, Some(&bias)).to_kind(Kind::Float);
            for adapter in [None, Some(false), Some(true)] {
                let mut layer = Linear::new(w.copy(), Some(bias.copy()));
                layer.adapter = adapter.map(|dora| lora(&w, dora, kind));
                let (full, full_grads) = run(&layer, &x, &g, false);
                let (unread, unread_grads) = run(&layer, &x, &g, true);
                let what = format!("{kind:?}, adapter {adapter:?} (Some(true): DoRA)");
                for (a, b) in full_grads.iter().zip(&unread_grads) {
                    assert!(a.equal(b), "{what}: gradients differ");
                }
                let full = full.to_kind(Kind::Float);
                let unread = unread.to_kind(Kind::Float);
                let max = |t: Tensor| t.abs().max().double_value(&[]);
                if adapter == Some(true) {
                    // DoRA reads the base output: it is computed.
                    assert!(full.equal(&unread), "{what}");
                } else {
                    // Only the adapter's part is left (in the output's dtype).
                    let adapter_part = &full - &frozen;
                    let tol = if kind == Kind::Float { 1e-5 } else { 0.1 };
                    assert!(
                        max(&unread - &adapter_part)
                            < tol * (1.0 + max(adapter_part.shallow_clone())),
                        "{what}"
                    );
                    assert!(
                        max(&full - &unread) > 0.1 * max(frozen.shallow_clone()),
                        "{what}: the product was computed"
                    );
                }
            }
        }
    }

    /// `layers`' outputs on `x` and the gradient of `<outputs, g>` for `x`
    /// and every trainable tensor, the frozen products as `products` says.
    fn run_same_input(
        layers: [&Linear; 2],
        x: &Tensor,
        g: &[Tensor; 2],
        products: &mut Products<'_>,
    ) -> (Vec<Tensor>, Vec<Tensor>) {
        let x = x.detach().set_requires_grad(true);
        let ys = forward_same_input_with(layers, &x, products);
        let total = ys
            .iter()
            .zip(g)
            .map(|(y, g)| (y.to_kind(Kind::Float) * g).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .expect("two layers");
        total.backward();
        let mut grads = vec![x.grad()];
        for layer in layers {
            if let Some(a) = &layer.adapter {
                for (_, t) in a.trainable_tensors() {
                    grads.push(t.grad());
                    let _ = t.grad().zero_();
                }
            }
        }
        (ys.iter().map(Tensor::detach).collect(), grads)
    }

    #[test]
    fn replayed_products_give_the_outputs_and_gradients_of_computed_ones() {
        if !crate::unread_linear::AVAILABLE {
            return;
        }
        tch::manual_seed(6);
        for kind in [Kind::Float, Kind::BFloat16] {
            let opts = (kind, Device::Cpu);
            let (w1, w2) = (Tensor::randn([12, 8], opts), Tensor::randn([10, 8], opts));
            let bias = Tensor::randn([12], opts);
            let x = Tensor::randn([3, 4, 8], opts);
            let g = [12, 10].map(|o| Tensor::randn([3, 4, o], (Kind::Float, Device::Cpu)));
            for adapter in [None, Some(false), Some(true)] {
                let what = format!("{kind:?}, adapter {adapter:?} (Some(true): DoRA)");
                let mut gate = Linear::new(w1.copy(), Some(bias.copy()));
                let mut up = Linear::new(w2.copy(), None);
                gate.adapter = adapter.map(|dora| lora(&w1, dora, kind));
                up.adapter = adapter.map(|dora| lora(&w2, dora, kind));
                let layers = [&gate, &up];
                let (outs, grads) = run_same_input(layers, &x, &g, &mut Products::Computed);
                // The forward pass of checkpointing keeps the frozen products.
                let mut kept = Vec::new();
                let kept_outs = tch::no_grad(|| {
                    forward_same_input_with(layers, &x, &mut Products::Kept(&mut kept))
                });
                assert_eq!(kept.len(), 2, "{what}");
                let rows = x.reshape([-1, 8]);
                let frozen = [
                    rows.linear(&w1, Some(&bias)),
                    rows.linear::<Tensor>(&w2, None),
                ];
                for (k, f) in kept.iter().zip(&frozen) {
                    let k = k.as_ref().expect("a dense product is kept");
                    assert!(k.equal(f), "{what}: the kept product is not x Wᵀ + b");
                }
                for (a, b) in kept_outs.iter().zip(&outs) {
                    assert!(a.equal(b), "{what}: keeping changes the output");
                }
                // The recompute replays them: same outputs, same gradients.
                let zeroed: Vec<Option<Tensor>> = kept
                    .iter()
                    .map(|k| k.as_ref().map(Tensor::zeros_like))
                    .collect();
                let mut replay = kept.into_iter();
                let (replayed, replayed_grads) =
                    run_same_input(layers, &x, &g, &mut Products::Replayed(&mut replay));
                for (a, b) in replayed.iter().zip(&outs) {
                    assert!(a.equal(b), "{what}: replayed outputs differ");
                }
                for (a, b) in replayed_grads.iter().zip(&grads) {
                    assert!(a.equal(b), "{what}: replayed gradients differ");
                }
                // The value does come from what was kept: zeros replayed give
                // outputs without the frozen product, the same input gradient.
                let mut replay = zeroed.into_iter();
                let (without, without_grads) =
                    run_same_input(layers, &x, &g, &mut Products::Replayed(&mut replay));
                let max = |t: Tensor| t.to_kind(Kind::Float).abs().max().double_value(&[]);
                assert!(
                    max(outs[0].reshape([-1, 12]) - &without[0].reshape([-1, 12]))
                        > 0.1 * max(frozen[0].shallow_clone()),
                    "{what}: the kept value was not used"
                );
                if adapter != Some(true) {
                    // DoRA's gradients read the base output's value.
                    assert!(without_grads[0].equal(&grads[0]), "{what}: input gradient");
                }
            }
        }
    }
}
