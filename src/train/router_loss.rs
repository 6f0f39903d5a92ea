//! The router's load-balancing loss of a mixture of experts, as transformers
//! computes it when a config sets `output_router_logits`
//! (`load_balancing_loss_func` of Qwen3-MoE and Mixtral, after the Switch
//! Transformer): over the sparse layers' rows (padding left out),
//!
//! `aux = experts · Σ_e T_e · P_e`
//!
//! with `T_e` the share of top-k choices that went to expert `e` and `P_e`
//! its mean routing probability. `T` is a count and carries no gradient, so
//! the loss is linear in each layer's summed probabilities: it splits into
//! one term per layer, and gradient checkpointing can add each layer's term
//! when it recomputes that layer, with `T` taken from the forward pass.

use tch::{Kind, Tensor};

/// The load-balancing loss of one forward pass, ready to be split by layer.
pub struct LoadBalancing {
    /// `[experts]`: `experts · T_e / rows`, the weight of each expert's summed
    /// probability in the loss.
    weights: Tensor,
    /// `[rows]` fp32: 1 for the tokens counted, 0 for padding.
    mask: Tensor,
    /// The loss's value.
    value: f64,
}

impl LoadBalancing {
    /// From the router logits of every sparse layer (`[rows, experts]`
    /// each, rows in `attention_mask`'s `[batch, seq]` order) and the top-k
    /// of the routing. `None` without sparse layers (transformers adds
    /// nothing then) or without a counted row.
    pub fn new(router_logits: &[Tensor], attention_mask: &Tensor, top_k: i64) -> Option<Self> {
        let first = router_logits.first()?;
        let experts = first.size()[1];
        let device = first.device();
        let mask = attention_mask
            .reshape([-1])
            .to_device(device)
            .to_kind(Kind::Float);
        let _no_grad = tch::no_grad_guard();
        let mut counts = Tensor::zeros([experts], (Kind::Float, device));
        let mut prob_sums = Tensor::zeros([experts], (Kind::Float, device));
        for logits in router_logits {
            let probs = routing_probabilities(logits);
            let (_, chosen) = probs.topk(top_k, -1, true, true);
            let once = mask.unsqueeze(-1).expand([-1, top_k], false).reshape([-1]);
            counts = counts.scatter_add(0, &chosen.reshape([-1]), &once);
            prob_sums += (&probs * mask.unsqueeze(-1)).sum_dim_intlist(0, false, Kind::Float);
        }
        let rows = mask.sum(Kind::Float).double_value(&[]) * router_logits.len() as f64;
        if rows == 0.0 {
            return None;
        }
        let weights = counts * (experts as f64 / (rows * rows));
        let value = (&weights * prob_sums).sum(Kind::Float).double_value(&[]);
        Some(Self {
            weights,
            mask,
            value,
        })
    }

    /// The loss (what transformers reports as `aux_loss`).
    pub fn value(&self) -> f64 {
        self.value
    }

    /// One layer's share of the loss from its router logits, differentiable
    /// through them; the shares of all sparse layers sum to the loss.
    pub fn layer_term(&self, router_logits: &Tensor) -> Tensor {
        let probs = routing_probabilities(router_logits);
        let sums = (probs * self.mask.unsqueeze(-1)).sum_dim_intlist(0, false, Kind::Float);
        (sums * &self.weights).sum(Kind::Float)
    }
}

/// The routing probabilities as the loss takes them: a softmax in the
/// logits' own dtype (not fp32, unlike the router's), then fp32.
fn routing_probabilities(logits: &Tensor) -> Tensor {
    logits.softmax(-1, logits.kind()).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The loss straight from its definition, with autograd: shares of
    /// top-k choices times mean probabilities over all layers' counted rows.
    fn by_definition(logits: &[Tensor], mask: &Tensor, top_k: i64) -> Tensor {
        let all = Tensor::cat(logits, 0);
        let experts = all.size()[1];
        let m = mask
            .reshape([-1])
            .to_kind(Kind::Float)
            .repeat([logits.len() as i64]);
        let probs = all.softmax(-1, Kind::Float);
        let (_, chosen) = probs.topk(top_k, -1, true, true);
        let onehot = chosen
            .one_hot(experts)
            .to_kind(Kind::Float)
            .sum_dim_intlist(1, false, Kind::Float);
        let rows = m.sum(Kind::Float);
        let t = (onehot * m.unsqueeze(-1)).sum_dim_intlist(0, false, Kind::Float) / &rows;
        let p = (probs * m.unsqueeze(-1)).sum_dim_intlist(0, false, Kind::Float) / &rows;
        (t * p).sum(Kind::Float) * experts as f64
    }

    #[test]
    fn layer_terms_sum_to_the_loss_and_its_gradient() {
        tch::manual_seed(7);
        let opts = (Kind::Float, Device::Cpu);
        let logits: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn([10, 5], opts).set_requires_grad(true))
            .collect();
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 0, 1, 1, 0, 0, 0]).reshape([2, 5]);
        let want = by_definition(&logits, &mask, 2);
        let lb = LoadBalancing::new(&logits, &mask, 2).unwrap();
        let want_value = want.double_value(&[]);
        assert!(
            (lb.value() - want_value).abs() < 1e-6,
            "{} vs {want_value}",
            lb.value()
        );
        want.backward();
        let want_grads: Vec<Tensor> = logits.iter().map(|l| l.grad().copy()).collect();
        for l in &logits {
            let _ = l.grad().zero_();
        }
        let mut total = Tensor::zeros([], opts);
        for l in &logits {
            total += lb.layer_term(l);
        }
        assert!((total.double_value(&[]) - want_value).abs() < 1e-6);
        total.backward();
        for (l, w) in logits.iter().zip(&want_grads) {
            let d = (l.grad() - w).abs().max().double_value(&[]);
            assert!(d < 1e-6, "gradient differs by {d}");
            // Padding rows get no gradient.
            assert_eq!(
                l.grad()
                    .narrow(0, 4, 1)
                    .abs()
                    .sum(Kind::Float)
                    .double_value(&[]),
                0.0
            );
        }
    }

    /// Balanced routing gives top_k (every expert chosen as often, each with
    /// probability 1/experts).
    #[test]
    fn uniform_routing_gives_top_k() {
        let logits = [Tensor::zeros([8, 4], (Kind::Float, Device::Cpu))];
        let mask = Tensor::ones([1, 8], (Kind::Int64, Device::Cpu));
        // With equal logits topk picks the first experts: 2 of 4, so T is
        // (1, 1, 0, 0) and P 1/4 each: 4 · (2 · 1/4) = 2.
        let lb = LoadBalancing::new(&logits, &mask, 2).unwrap();
        assert!((lb.value() - 2.0).abs() < 1e-6, "{}", lb.value());
        assert!(LoadBalancing::new(&[], &mask, 2).is_none());
    }
}
