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
        // Every expert's rows in one grouped matmul per product where
        // libtorch can (see [`Groups::matmul`]); the rows are sorted by expert.
        let groups = Groups::new(&counts, x.device());
        let expert_of_row = flat.index_select(0, &order);
        let project = |w: &Tensor, b: &Option<Tensor>, lora: &Option<ParamLora>, x: &Tensor| {
            let w = if self.transposed() {
                w.shallow_clone()
            } else {
                w.transpose(1, 2)
            };
            let y = groups.matmul(x, &w);
            let y = match b {
                Some(b) => y + b.index_select(0, &expert_of_row),
                None => y,
            };
            match lora.as_ref().filter(|l| l.applies()) {
                Some(l) => {
                    let (a, b) = l.grouped_factors(x.kind());
                    y + groups.matmul(&groups.matmul(x, &a), &b) * l.scaling
                }
                None => y,
            }
        };
        let gu = project(
            &self.gate_up_proj,
            &self.gate_up_proj_bias,
            &self.gate_up_lora,
            &rows,
        );
        let h = self.activation(&gu);
        let out = project(&self.down_proj, &self.down_proj_bias, &self.down_lora, &h);
        let out = out * weights.unsqueeze(-1);
        x.zeros_like().index_add(0, &token, &out.to_kind(x.kind()))
    }

    /// Whether the experts are stored `[experts, in, out]` (gpt-oss).
    fn transposed(&self) -> bool {
        matches!(self.style, ExpertStyle::GptOss { .. })
    }

    /// The gated activation of `gate_up` rows: SiLU(gate) · up over the two
    /// halves, or gpt-oss's clamped SwiGLU over interleaved columns.
    fn activation(&self, gu: &Tensor) -> Tensor {
        match self.style {
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
        }
    }

    /// Expert `e` on its rows, one product at a time (`x Wᵀ` per
    /// projection plus its LoRA's `s·x Aᵀ Bᵀ`): the reference the grouped
    /// computation is tested against.
    #[cfg(test)]
    fn expert(&self, e: i64, x: &Tensor) -> Tensor {
        let project = |w: &Tensor, b: &Option<Tensor>, lora: &Option<ParamLora>, x: &Tensor| {
            let w = w.get(e);
            let y = if self.transposed() {
                x.matmul(&w)
            } else {
                x.linear::<Tensor>(&w, None)
            };
            let y = match b {
                Some(b) => y + b.get(e),
                None => y,
            };
            match lora.as_ref().filter(|l| l.applies()) {
                Some(l) => y + l.forward(e, x),
                None => y,
            }
        };
        let gu = project(
            &self.gate_up_proj,
            &self.gate_up_proj_bias,
            &self.gate_up_lora,
            x,
        );
        let h = self.activation(&gu);
        project(&self.down_proj, &self.down_proj_bias, &self.down_lora, &h)
    }
}

/// Rows sorted by expert, in groups of `counts`: what a grouped matmul needs.
struct Groups<'a> {
    counts: &'a [i64],
    /// The end of each group (int32), as `_grouped_mm` takes them.
    offs: Tensor,
}

impl<'a> Groups<'a> {
    fn new(counts: &'a [i64], device: tch::Device) -> Self {
        let offs = Tensor::from_slice(counts)
            .cumsum(0, Kind::Int)
            .to_device(device);
        Self { counts, offs }
    }

    /// Each group's rows of `x` `[rows, k]` times its expert's matrix of
    /// `w` `[experts, k, n]`: libtorch's `_grouped_mm` (one kernel for all
    /// experts, as transformers' default experts implementation) where its
    /// operands qualify (16-byte aligned strides), else one matmul per
    /// expert (an adapter of rank 4 in bf16 has 8-byte rows).
    fn matmul(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let bytes = x.kind().elt_size_in_bytes() as i64;
        if grouped_kernel_fits(x.device(), bytes, &x.stride(), &w.stride()) {
            return x.internal_grouped_mm(w, Some(&self.offs), None::<&Tensor>, None);
        }
        let parts: Vec<Tensor> = x
            .split_with_sizes(self.counts, 0)
            .iter()
            .zip(w.unbind(0))
            .map(|(rows, m)| rows.matmul(&m))
            .collect();
        Tensor::cat(&parts, 0)
    }
}

/// Whether libtorch's `_grouped_mm` takes operands of these strides (in
/// elements of `bytes` bytes) on `device`: on the CPU, every stride 1 or a
/// multiple of 16 bytes and one of the last two dimensions unit-strided.
/// Its CUDA kernels want bf16 on recent GPUs only, so CUDA keeps one
/// matmul per expert.
fn grouped_kernel_fits(device: tch::Device, bytes: i64, x: &[i64], w: &[i64]) -> bool {
    let fits = |stride: &[i64]| {
        let n = stride.len();
        (stride[n - 2] == 1 || stride[n - 1] == 1)
            && stride.iter().all(|&st| st == 1 || (st * bytes) % 16 == 0)
    };
    device == tch::Device::Cpu && fits(x) && fits(w)
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
        // Hidden 8 and width 6 in fp32 leave 24-byte rows (one matmul per
        // expert); 16 and 8 qualify for libtorch's grouped matmul.
        for (h, i) in [(8, 6), (16, 8)] {
            let (router, experts) = experts(5, h, i);
            let x = Tensor::randn([13, h], (Kind::Float, Device::Cpu));
            let routing = router.forward(&x);
            let grouped = experts.forward(&x, &routing);
            for t in 0..13 {
                let row = x.narrow(0, t, 1);
                let mut want = row.zeros_like();
                for k in 0..2 {
                    let e = routing.experts.int64_value(&[t, k]);
                    let w = routing.weights.double_value(&[t, k]);
                    want += experts.expert(e, &row) * w;
                }
                let d = (grouped.narrow(0, t, 1) - want)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(d < 1e-5, "hidden {h}, token {t}: {d}");
            }
            // norm_topk_prob: each token's weights sum to 1.
            let sums = routing.weights.sum_dim_intlist(-1, false, Kind::Float);
            assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-6);
        }
    }

    /// The grouped kernel: CPU operands with aligned rows only.
    #[test]
    fn grouped_kernel_only_where_it_takes_the_operands() {
        let x = [512, 1]; // [rows, 512] contiguous
        let w = [512 * 1536, 1, 512]; // [experts, 1536, 512] seen transposed
        assert!(grouped_kernel_fits(Device::Cpu, 2, &x, &w));
        assert!(!grouped_kernel_fits(Device::Cuda(0), 2, &x, &w));
        // Rank 4 in bf16: 8-byte rows.
        assert!(!grouped_kernel_fits(Device::Cpu, 2, &[4, 1], &w));
        // Strided along both of the last dimensions.
        assert!(!grouped_kernel_fits(Device::Cpu, 4, &x, &[96, 4, 32]));
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
