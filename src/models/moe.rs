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

use peft_adapters::lora::param::ParamLora;
use tch::{Kind, Tensor};

use super::config::ExpertStyle;

/// `mlp.gate` (`mlp.router` in gpt-oss): scores every expert, keeps the top `top_k`.
pub struct TopKRouter {
    /// `weight`, `[experts, hidden]`.
    pub weight: Tensor,
    /// `bias`, `[experts]` (gpt-oss).
    pub bias: Option<Tensor>,
    /// Softmax over all experts then top k, or (gpt-oss) top k logits then
    /// a softmax over those.
    pub(crate) style: ExpertStyle,
    pub(crate) top_k: i64,
    /// Renormalize the kept probabilities to sum to 1.
    pub(crate) norm_topk_prob: bool,
    /// Whether the routing weights are cast back to the model dtype
    /// (Qwen3-MoE) or kept in fp32 (Mixtral).
    pub(crate) weights_in_model_dtype: bool,
    /// LoRA on `weight` (PEFT's `target_parameters` `gate.weight`).
    pub lora: Option<ParamLora>,
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
    /// Routes `[tokens, hidden]` rows; the softmax is taken in fp32 (over
    /// the top k logits in the model dtype for gpt-oss).
    pub fn forward(&self, x: &Tensor) -> Routing {
        let plain = x.linear(&self.weight, self.bias.as_ref());
        let logits = match self.lora.as_ref().filter(|l| l.applies()) {
            Some(l) => plain + l.forward(0, x),
            None => plain,
        };
        if let ExpertStyle::GptOss { .. } = self.style {
            let (top, experts) = logits.topk(self.top_k, -1, true, true);
            return Routing {
                weights: top.softmax(1, top.kind()),
                experts,
                logits,
            };
        }
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
    /// projection, then its up projection. gpt-oss: `[experts, hidden,
    /// 2·inter]`, gate and up interleaved column by column.
    pub gate_up_proj: Tensor,
    /// `down_proj`, `[experts, hidden, inter]` (gpt-oss: `[experts, inter, hidden]`).
    pub down_proj: Tensor,
    /// `gate_up_proj_bias`, `[experts, 2·inter]` (gpt-oss).
    pub gate_up_proj_bias: Option<Tensor>,
    /// `down_proj_bias`, `[experts, hidden]` (gpt-oss).
    pub down_proj_bias: Option<Tensor>,
    pub(crate) style: ExpertStyle,
    /// LoRA on `gate_up_proj` (PEFT's `target_parameters`).
    pub gate_up_lora: Option<ParamLora>,
    /// LoRA on `down_proj`.
    pub down_lora: Option<ParamLora>,
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
        if flat.numel() == 0 {
            return x.zeros_like();
        }
        // One split (and each adapter's factors unbound once): slicing per
        // expert would make autograd build a full-size gradient per expert.
        let kind = x.kind();
        let factors = |l: &Option<ParamLora>| {
            l.as_ref()
                .filter(|l| l.applies())
                .map(|l| l.expert_factors(kind))
        };
        let (gate_up, down) = (factors(&self.gate_up_lora), factors(&self.down_lora));
        let mut outs = Vec::new();
        for (e, part) in rows.split_with_sizes(&counts, 0).iter().enumerate() {
            if counts[e] == 0 {
                continue;
            }
            let (gu, dn) = (
                gate_up.as_ref().map(|f| &f[e]),
                down.as_ref().map(|f| &f[e]),
            );
            outs.push(self.expert(e as i64, part, gu, dn));
        }
        let out = Tensor::cat(&outs, 0) * weights.unsqueeze(-1);
        x.zeros_like().index_add(0, &token, &out.to_kind(x.kind()))
    }

    /// Expert `e` on its rows: `down(act(gate(x), up(x)))`, each
    /// projection with its LoRA (as PEFT applies it: W + ΔW) if it has one,
    /// given as that expert's factors ([`ParamLora::expert_factors`]).
    fn expert(
        &self,
        e: i64,
        x: &Tensor,
        gate_up: Option<&(Tensor, Tensor)>,
        down: Option<&(Tensor, Tensor)>,
    ) -> Tensor {
        let transposed = matches!(self.style, ExpertStyle::GptOss { .. });
        let project = |w: &Tensor,
                       b: &Option<Tensor>,
                       lora: &Option<ParamLora>,
                       factors: Option<&(Tensor, Tensor)>,
                       x: &Tensor| {
            let w = w.get(e);
            let y = if transposed {
                x.matmul(&w)
            } else {
                x.linear::<Tensor>(&w, None)
            };
            let y = match b {
                Some(b) => y + b.get(e),
                None => y,
            };
            match (lora, factors) {
                (Some(l), Some(f)) => y + l.forward_with(f, x),
                _ => y,
            }
        };
        let gu = project(
            &self.gate_up_proj,
            &self.gate_up_proj_bias,
            &self.gate_up_lora,
            gate_up,
            x,
        );
        let h = match self.style {
            ExpertStyle::SwiGlu => {
                let half = gu.size()[1] / 2;
                gu.narrow(1, 0, half).silu() * gu.narrow(1, half, half)
            }
            ExpertStyle::GptOss { alpha, limit } => {
                let gate = gu.slice(1, 0, None, 2).clamp_max(limit);
                let up = gu.slice(1, 1, None, 2).clamp(-limit, limit);
                let glu = &gate * (&gate * alpha).sigmoid();
                (up + 1.0) * glu
            }
        };
        project(
            &self.down_proj,
            &self.down_proj_bias,
            &self.down_lora,
            down,
            &h,
        )
    }
}

/// Runs a sparse MLP on `[batch, seq, hidden]`: its output, and the router
/// logits `[batch·seq, experts]` (transformers' `router_logits`, what the
/// load-balancing loss reads).
pub fn forward(gate: &TopKRouter, experts: &Experts, x: &Tensor) -> (Tensor, Tensor) {
    let shape = x.size();
    let rows = x.reshape([-1, *shape.last().expect("hidden")]);
    let routing = gate.forward(&rows);
    let out = experts.forward(&rows, &routing).reshape(shape);
    (out, routing.logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn experts(e: i64, h: i64, i: i64) -> (TopKRouter, Experts) {
        let opts = (Kind::Float, Device::Cpu);
        let router = TopKRouter {
            weight: Tensor::randn([e, h], opts),
            bias: None,
            style: ExpertStyle::SwiGlu,
            top_k: 2,
            norm_topk_prob: true,
            weights_in_model_dtype: true,
            lora: None,
        };
        let experts = Experts {
            gate_up_proj: Tensor::randn([e, 2 * i, h], opts) * 0.3,
            down_proj: Tensor::randn([e, h, i], opts) * 0.3,
            gate_up_proj_bias: None,
            down_proj_bias: None,
            style: ExpertStyle::SwiGlu,
            gate_up_lora: None,
            down_lora: None,
        };
        (router, experts)
    }

    /// The grouped computation equals the plain sum over each token's
    /// chosen experts, computed token by token.
    #[test]
    fn grouped_experts_equal_a_token_by_token_sum() {
        tch::manual_seed(3);
        let (router, experts) = experts(5, 8, 6);
        let x = Tensor::randn([13, 8], (Kind::Float, Device::Cpu));
        let routing = router.forward(&x);
        let grouped = experts.forward(&x, &routing);
        for t in 0..13 {
            let row = x.narrow(0, t, 1);
            let mut want = row.zeros_like();
            for k in 0..2 {
                let e = routing.experts.int64_value(&[t, k]);
                let w = routing.weights.double_value(&[t, k]);
                want += experts.expert(e, &row, None, None) * w;
            }
            let d = (grouped.narrow(0, t, 1) - want)
                .abs()
                .max()
                .double_value(&[]);
            assert!(d < 1e-5, "token {t}: {d}");
        }
        // norm_topk_prob: each token's weights sum to 1.
        let sums = routing.weights.sum_dim_intlist(-1, false, Kind::Float);
        assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-6);
    }

    /// No rows (an empty batch) give no rows, not a panic.
    #[test]
    fn no_rows_give_no_rows() {
        let (router, experts) = experts(4, 8, 6);
        let x = Tensor::zeros([0, 8], (Kind::Float, Device::Cpu));
        let out = experts.forward(&x, &router.forward(&x));
        assert_eq!(out.size(), vec![0, 8]);
    }
}
