//! The cross-entropy of the language-model head, in chunks of rows so that
//! the full fp32 logits never sit in memory, with its gradient computed
//! alongside for a plain head (no logits, log-probabilities and their
//! gradient kept for a backward pass).

use anyhow::Result;
use tch::{Device, Kind, Reduction, Tensor};

use crate::models::LlamaForCausalLM;

/// Sum of cross-entropy over label tokens, computed on at most `chunk` rows of
/// logits at a time so that the full fp32 logits never sit in memory. With
/// `backward_scale`, each chunk's loss divided by it is backpropagated at once
/// (and the chunks' gradients then flow into `hidden` together).
pub fn chunked_cross_entropy(
    model: &LlamaForCausalLM,
    hidden: &Tensor,
    labels: &Tensor,
    chunk: i64,
    backward_scale: Option<f64>,
) -> Result<f64> {
    chunked_cross_entropy_with(model, hidden, labels, chunk, backward_scale, None)
}

/// [`chunked_cross_entropy`] whose backward pass (with `backward_scale`)
/// also backpropagates `also`, a scalar on the same graph (the router's
/// load-balancing loss): one pass through the model for both.
pub fn chunked_cross_entropy_with(
    model: &LlamaForCausalLM,
    hidden: &Tensor,
    labels: &Tensor,
    chunk: i64,
    backward_scale: Option<f64>,
    also: Option<Tensor>,
) -> Result<f64> {
    let backward_also = |also: Option<Tensor>| {
        if let Some(t) = also.filter(Tensor::requires_grad) {
            t.backward();
        }
    };
    let (_, t, h) = hidden.size3()?;
    // Position i predicts token i+1.
    let hs = hidden.narrow(1, 0, t - 1).reshape([-1, h]);
    let ys = labels.narrow(1, 1, t - 1).reshape([-1]);
    let idx = ys.ne(-100).nonzero().squeeze_dim(1);
    let n = idx.size()[0];
    // A sharded base's plain head (`--fsdp`): every rank takes part, rows or not.
    if let Some(f) = model.vocab_parallel_head() {
        let sel = hs.index_select(0, &idx);
        let (loss, grad) = f.cross_entropy(&sel, &ys.index_select(0, &idx), chunk, backward_scale);
        match grad {
            Some(grad) if sel.requires_grad() => {
                let mut pending = (sel * grad).sum(Kind::Float);
                if let Some(t) = also.filter(Tensor::requires_grad) {
                    pending += t;
                }
                pending.backward();
            }
            _ => backward_also(also),
        }
        return Ok(loss);
    }
    if n == 0 {
        backward_also(also);
        return Ok(0.0);
    }
    let sel = hs.index_select(0, &idx);
    let targets = ys.index_select(0, &idx);
    let chunks = (0..n)
        .step_by(chunk as usize)
        .map(|s| (s, chunk.min(n - s)));
    let Some(scale) = backward_scale else {
        let mut total = Tensor::zeros([], (Kind::Float, sel.device()));
        for (s, m) in chunks {
            let logits = model.logits(&sel.narrow(0, s, m)).to_kind(Kind::Float);
            total += cross_entropy_sum(&logits, &targets.narrow(0, s, m));
        }
        return Ok(total.double_value(&[]));
    };
    let mut total = Tensor::zeros([], (Kind::Float, sel.device()));
    let grad = match model.plain_lm_head() {
        // The usual head: the gradient is computed with the loss, chunk by
        // chunk, without autograd keeping logits, log-probabilities and
        // their gradient (three chunk-sized tensors) for a backward pass.
        Some((w, bias)) => {
            let _g = tch::no_grad_guard();
            let grad = sel.zeros_like();
            for (s, m) in chunks {
                let (loss, g) = cross_entropy_and_input_grad(
                    &sel.narrow(0, s, m),
                    &w,
                    bias,
                    &targets.narrow(0, s, m),
                    scale,
                );
                total += loss;
                grad.narrow(0, s, m).copy_(&g);
            }
            grad
        }
        // A head with an adapter or soft-capping: autograd, chunk by chunk.
        None => {
            let leaf = sel.detach().set_requires_grad(true);
            for (s, m) in chunks {
                let logits = model.logits(&leaf.narrow(0, s, m)).to_kind(Kind::Float);
                let ce = cross_entropy_sum(&logits, &targets.narrow(0, s, m));
                total += ce.detach();
                (ce / scale).backward();
            }
            leaf.grad()
        }
    };
    if sel.requires_grad() {
        let mut pending = (sel * grad).sum(Kind::Float);
        if let Some(t) = also.filter(Tensor::requires_grad) {
            pending += t;
        }
        pending.backward();
    } else {
        backward_also(also);
    }
    Ok(total.double_value(&[]))
}

/// Summed cross-entropy of fp32 `logits` `[rows, vocab]` against `targets`.
fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(targets, None, Reduction::Sum, -100, 0.0)
}

/// Rows of `vocab`-wide logits whose probabilities are worked out in fp32
/// at once: on the CPU 2 MB of them, so that a block stays in the cache
/// between the passes of log-softmax, exp and the cast back (4 rows of
/// Llama 3's 128,256-token vocabulary, 10 of SmolLM2's 49,152); on a GPU
/// 64 MB, where each pass is a kernel launch and there is no cache to stay in.
pub fn probs_block_rows(vocab: i64, device: Device) -> i64 {
    let elements: i64 = if device.is_cuda() { 1 << 24 } else { 1 << 19 };
    (elements / vocab.max(1)).max(1)
}

/// The summed cross-entropy of `x Wᵀ + b` against `targets`, and the
/// gradient of that sum divided by `scale` with respect to `x`:
/// `(softmax − onehot) W / scale`, in the weight's dtype.
///
/// The logits' buffer becomes `softmax − onehot` in place, a few rows at a
/// time: the chunk holds one `[rows, vocab]` tensor in the weight's dtype
/// instead of that plus its fp32 copy, log-probabilities and their cast
/// back (12 bytes an element for a bf16 head, 2 now), and each pass reads
/// rows still in the cache. Every row goes through the same operations as
/// when the whole chunk went at once, so the gradient is that one's bit for bit.
fn cross_entropy_and_input_grad(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    scale: f64,
) -> (Tensor, Tensor) {
    let logits = x.linear(w, bias);
    let (rows, vocab) = logits.size2().expect("logits are [rows, vocab]");
    let t = targets.unsqueeze(1);
    let device = x.device();
    let picked = Tensor::empty([rows, 1], (Kind::Float, device));
    let minus_one = Tensor::full([rows, 1], -1.0, (Kind::Float, device));
    let block = probs_block_rows(vocab, device);
    for start in (0..rows).step_by(block as usize) {
        let n = block.min(rows - start);
        let (mut out, t) = (logits.narrow(0, start, n), t.narrow(0, start, n));
        let mut logp = out.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
        picked.narrow(0, start, n).copy_(&logp.gather(1, &t, false));
        let mut d = logp.exp_();
        let _ = d.scatter_add_(1, &t, &minus_one.narrow(0, 0, n));
        if w.kind() != Kind::Float {
            // Scaled before the cast, as autograd would: an fp16 loss scale
            // exists so that small probabilities survive the cast.
            d *= 1.0 / scale;
        }
        out.copy_(&d);
    }
    let loss = -picked.sum(Kind::Float);
    let g = if w.kind() == Kind::Float {
        logits.mm(w) / scale
    } else {
        logits.mm(w)
    };
    (loss, g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_blocks_fit_the_cache_on_the_cpu_and_cut_launches_on_a_gpu() {
        assert_eq!(probs_block_rows(128_256, Device::Cpu), 4);
        assert_eq!(probs_block_rows(49_152, Device::Cpu), 10);
        assert_eq!(probs_block_rows(128_256, Device::Cuda(0)), 130);
        assert_eq!(probs_block_rows(49_152, Device::Cuda(1)), 341);
        // A vocabulary wider than a block still makes progress, a row at a time.
        assert_eq!(probs_block_rows(1 << 20, Device::Cpu), 1);
        assert_eq!(probs_block_rows(0, Device::Cpu), 1 << 19);
    }
}
