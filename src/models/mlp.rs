//! `model.layers.N.mlp`: the gated feed-forward block (SwiGLU, or Gemma's
//! GELU-tanh), with separate or Phi-3's fused gate and up projections, or
//! a mixture of experts (see [`super::moe`]).

use tch::Tensor;

use super::moe::{Experts, TopKRouter};
use crate::nn::{forward_same_input_with, Linear, Products};

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `silu` (Llama, Mistral, Qwen).
    Silu,
    /// `gelu_pytorch_tanh` (Gemma).
    GeluTanh,
}

/// `model.layers.N.mlp`.
pub struct Mlp {
    /// `gate_proj`.
    pub gate_proj: Linear,
    /// `up_proj`.
    pub up_proj: Linear,
    /// `down_proj`.
    pub down_proj: Linear,
    /// `gate_up_proj` (Phi-3; empty elsewhere).
    pub gate_up_proj: Linear,
    /// `gate`: the router of a mixture-of-experts layer (else `None`).
    pub gate: Option<TopKRouter>,
    /// `experts` of a mixture-of-experts layer (else `None`).
    pub experts: Option<Experts>,
    pub(crate) act: Activation,
    pub(crate) fused: bool,
}

impl Mlp {
    /// The router's and experts' tensors of a mixture-of-experts layer.
    pub fn sparse_tensors(&self) -> impl Iterator<Item = &Tensor> {
        let gate = self
            .gate
            .iter()
            .flat_map(|g| std::iter::once(&g.weight).chain(g.bias.as_ref()));
        let experts = self.experts.iter().flat_map(|e| {
            [&e.gate_up_proj, &e.down_proj]
                .into_iter()
                .chain(e.gate_up_proj_bias.as_ref())
                .chain(e.down_proj_bias.as_ref())
        });
        gate.chain(experts)
    }

    /// The MLP's output, and a sparse layer's router logits (`[rows, experts]`).
    /// With `unread`, the output is only backpropagated through, never read
    /// (a layer recomputed under gradient checkpointing): the down
    /// projection's frozen product is skipped ([`Linear::forward_unread`]).
    /// The gate and up projections' frozen products are kept or replayed as
    /// `products` says (`--gradient-checkpointing-keep-mlp`).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        products: &mut Products<'_>,
        unread: bool,
    ) -> (Tensor, Option<Tensor>) {
        if let (Some(router), Some(experts)) = (&self.gate, &self.experts) {
            let (out, logits) = super::moe::forward(router, experts, x);
            return (out, Some(logits));
        }
        let (gate, up) = if self.fused {
            let [gu] = forward_same_input_with([&self.gate_up_proj], x, products);
            let half = gu.size().last().copied().unwrap_or(0) / 2;
            (gu.narrow(-1, 0, half), gu.narrow(-1, half, half))
        } else {
            let [gate, up] = forward_same_input_with([&self.gate_proj, &self.up_proj], x, products);
            (gate, up)
        };
        let gate = match self.act {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
        };
        let h = gate * up;
        let out = if unread {
            self.down_proj.forward_unread(&h)
        } else {
            self.down_proj.forward(&h)
        };
        (out, None)
    }
}
