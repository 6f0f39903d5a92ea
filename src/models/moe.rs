//! `model.layers.N.mlp` of a mixture-of-experts layer: the router
//! (`mlp.gate`, a `[experts, hidden]` weight) and the experts, stored as
//! transformers 5 stores them, one 3D parameter per projection
//! (`mlp.experts.gate_up_proj` `[experts, 2·inter, hidden]`,
//! `mlp.experts.down_proj` `[experts, hidden, inter]`).
//!
//! transformers loops over the experts hit and gathers each one's tokens
//! with a one-hot mask per expert. Here the (token, expert) pairs are sorted
//! by expert once, and each active expert runs one matmul over its
//! contiguous rows: the same products, added in the same order.

use tch::{Kind, Tensor};

/// `mlp.gate`: scores every expert, keeps the top `top_k`.
pub struct TopKRouter {
    /// `weight`, `[experts, hidden]`.
    pub weight: Tensor,
    pub(crate) top_k: i64,
    /// Renormalize the kept probabilities to sum to 1.
    pub(crate) norm_topk_prob: bool,
    /// Whether the routing weights are cast back to the model dtype
    /// (Qwen3-MoE) or kept in fp32 (Mixtral).
    pub(crate) weights_in_model_dtype: bool,
}

/// What the router decided for `[tokens, hidden]` inputs.
pub struct Routing {
    /// `[tokens, experts]`, in the model dtype (what the load-balancing loss reads).
    pub logits: Tensor,
    /// `[tokens, top_k]` routing weights.
    pub weights: Tensor,
    /// `[tokens, top_k]` expert indices.
    pub experts: Tensor,
}

impl TopKRouter {
    /// Routes `[tokens, hidden]` rows; the softmax is taken in fp32.
    pub fn forward(&self, x: &Tensor) -> Routing {
        let logits = x.linear::<Tensor>(&self.weight, None);
        let probs = logits.softmax(-1, Kind::Float);
        let (mut top, experts) = probs.topk(self.top_k, -1, true, true);
        if self.norm_topk_prob {
            top = &top / top.sum_dim_intlist(-1, true, Kind::Float);
        }
        let weights = if self.weights_in_model_dtype {
            top.to_kind(logits.kind())
        } else {
            top
        };
        Routing {
            logits,
            weights,
            experts,
        }
    }
}

/// `mlp.experts`: SwiGLU experts stacked along the first dimension.
pub struct Experts {
    /// `gate_up_proj`, `[experts, 2·inter, hidden]`: each expert's gate
    /// projection, then its up projection.
    pub gate_up_proj: Tensor,
    /// `down_proj`, `[experts, hidden, inter]`.
    pub down_proj: Tensor,
}

impl Experts {
    /// The number of experts.
    pub fn num_experts(&self) -> i64 {
        self.gate_up_proj.size()[0]
    }

    /// `Σ_k weight_k · expert_k(x)` for every row of `x` `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Tensor {
        let top_k = routing.experts.size()[1];
        let flat = routing.experts.reshape([-1]);
        // Stable: each expert's rows stay in token order, as transformers' mask gives them.
        let (_, order) = flat.sort_stable(true, 0, false);
        let counts = Vec::<i64>::try_from(flat.bincount::<Tensor>(None, self.num_experts()))
            .expect("expert counts");
        let token = order.divide_scalar_mode(top_k, "floor");
        let rows = x.index_select(0, &token);
        let weights = routing.weights.reshape([-1]).index_select(0, &order);
        let mut outs = Vec::new();
        let mut start = 0;
        for (e, &n) in counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            outs.push(self.expert(e as i64, &rows.narrow(0, start, n)));
            start += n;
        }
        let out = Tensor::cat(&outs, 0) * weights.unsqueeze(-1);
        x.zeros_like().index_add(0, &token, &out.to_kind(x.kind()))
    }

    /// Expert `e` on its rows: `down(silu(gate(x)) · up(x))`.
    fn expert(&self, e: i64, x: &Tensor) -> Tensor {
        let gu = x.linear::<Tensor>(&self.gate_up_proj.get(e), None);
        let half = gu.size()[1] / 2;
        let h = gu.narrow(1, 0, half).silu() * gu.narrow(1, half, half);
        h.linear::<Tensor>(&self.down_proj.get(e), None)
    }
}

/// Runs a sparse MLP on `[batch, seq, hidden]`.
pub fn forward(gate: &TopKRouter, experts: &Experts, x: &Tensor) -> Tensor {
    let shape = x.size();
    let rows = x.reshape([-1, *shape.last().expect("hidden")]);
    let routing = gate.forward(&rows);
    experts.forward(&rows, &routing).reshape(shape)
}
