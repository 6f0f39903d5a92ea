//! The embeddings and the output head of a sharded base (`--fsdp`) used
//! where they lie, each rank holding a block of vocabulary rows, instead of
//! gathered whole: the largest tensors of a model with a large vocabulary
//! (a fifth of SmolLM2 in fp32, two thirds of it in 4 bits) never exist
//! whole on a rank.
//!
//! Ranks hold different examples, so the rows of every rank travel instead
//! (a few MB: tokens × hidden, against vocabulary × hidden for the table):
//! - embedding: every rank's token ids are gathered; each rank looks up
//!   the ids in its block (zeros elsewhere) and a sum over the ranks gives
//!   each row its one embedding, exactly;
//! - cross-entropy: every rank's hidden rows and targets are gathered; each
//!   rank computes the logits of its vocabulary block for all rows, and the
//!   softmax's maximum, its sum and the target logit are combined over the
//!   ranks (Megatron's vocabulary-parallel cross-entropy); the gradient
//!   with respect to the rows is each block's `(softmax − onehot) W`,
//!   summed over the ranks.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::fsdp::{Fsdp, UnitId};

/// Every rank's rows, in rank order: rank r's `counts[r]` rows start at
/// row `r · width`, the rest of its block is padding.
pub(crate) struct Exchanged {
    pub rows: Tensor,
    pub counts: Vec<i64>,
    pub width: i64,
}

impl Exchanged {
    /// `[rows]`: whether each exchanged row is real (not padding).
    fn real(&self) -> Tensor {
        let world = self.counts.len() as i64;
        let counts = Tensor::from_slice(&self.counts).to_device(self.rows.device());
        let within = Tensor::arange(self.width, (Kind::Int64, self.rows.device()));
        within
            .unsqueeze(0)
            .lt_tensor(&counts.unsqueeze(1))
            .reshape([world * self.width])
    }
}

impl Fsdp {
    /// Gathers every rank's `x` (`[n, ...]`, n may differ per rank), padded
    /// to the largest n.
    pub(crate) fn exchange(&self, x: &Tensor) -> Result<Exchanged> {
        // After a failed collective the pass runs on to its end without
        // waiting for a rank that is gone.
        self.check()?;
        let n = x.size()[0];
        let counts = self
            .group()
            .all_gather(&Tensor::from_slice(&[n]).to_device(x.device()))?;
        let counts = Vec::<i64>::try_from(counts.reshape([-1]).to_device(tch::Device::Cpu))?;
        self.exchange_counted(x, counts)
    }

    /// [`Fsdp::exchange`] of rows whose counts per rank are known (those
    /// of rows exchanged before, such as the targets of exchanged hidden rows).
    fn exchange_counted(&self, x: &Tensor, counts: Vec<i64>) -> Result<Exchanged> {
        self.check()?;
        let g = self.group();
        let n = x.size()[0];
        let width = counts.iter().copied().max().unwrap_or(0);
        let mut size = x.size();
        size[0] = width - n;
        let padded = Tensor::cat(
            &[
                x.shallow_clone(),
                x.new_zeros(&size[..], (x.kind(), x.device())),
            ],
            0,
        );
        let all = g.all_gather(&padded.contiguous().reshape([-1]))?;
        size[0] = counts.len() as i64 * width;
        Ok(Exchanged {
            rows: all.reshape(&size[..]),
            counts,
            width,
        })
    }

    /// `embed_tokens(input_ids)` (`[..., hidden]` for `[...]` ids) with the
    /// table sharded by rows. A failed collective is recorded (see
    /// [`Fsdp::take_error`]) and zeros are returned.
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        let (table, start) = self.row_block(UnitId::Embedding);
        let hidden = table.size()[1];
        let mut out_size = input_ids.size();
        out_size.push(hidden);
        self.prefetch_first_layer();
        let result = (|| -> Result<Tensor> {
            let ids = self.exchange(&input_ids.reshape([-1, 1]))?;
            let local = ids.rows.reshape([-1]) - start;
            let rows = table.size()[0];
            let mine = local
                .ge(0)
                .logical_and(&local.lt(rows))
                .logical_and(&ids.real());
            let mut emb = table
                .index_select(0, &local.clamp(0, (rows - 1).max(0)))
                .masked_fill(&mine.logical_not().unsqueeze(1), 0.0);
            // Each real row has its one embedding on one rank, zeros on the others.
            self.group().all_reduce_sum(&mut emb)?;
            let me = self.group().rank() as i64;
            let n = input_ids.numel() as i64;
            Ok(emb.narrow(0, me * ids.width, n).reshape(&out_size[..]))
        })();
        result.unwrap_or_else(|e| {
            self.fail(e);
            Tensor::zeros(&out_size[..], (table.kind(), table.device()))
        })
    }

    /// The summed cross-entropy of the rows `x` (`[n, hidden]`) against
    /// `targets` (`[n]`, every one a real label) under the output head
    /// sharded by vocabulary rows, computed `chunk` rows at a time; with
    /// `scale`, also the gradient of that sum divided by `scale` with respect
    /// to `x` (in `x`'s dtype), as [`crate::train`]'s plain head computes it.
    pub fn cross_entropy(
        &self,
        x: &Tensor,
        targets: &Tensor,
        chunk: i64,
        scale: Option<f64>,
    ) -> (f64, Option<Tensor>) {
        let _g = tch::no_grad_guard();
        let result = self.cross_entropy_inner(x, targets, chunk, scale);
        result.unwrap_or_else(|e| {
            self.fail(e);
            (0.0, scale.map(|_| x.zeros_like()))
        })
    }

    fn cross_entropy_inner(
        &self,
        x: &Tensor,
        targets: &Tensor,
        chunk: i64,
        scale: Option<f64>,
    ) -> Result<(f64, Option<Tensor>)> {
        let (w, start) = self.row_block(self.head_unit());
        let g = self.group();
        let xs = self.exchange(&x.detach().to_kind(w.kind()))?;
        let ts = self.exchange_counted(&targets.reshape([-1, 1]), xs.counts.clone())?;
        let (real, ts) = (xs.real(), ts.rows.reshape([-1]));
        let total = xs.rows.size()[0];
        let device = w.device();
        let losses = Tensor::zeros([total], (Kind::Float, device));
        let grads = scale.map(|_| Tensor::zeros([total, w.size()[1]], (Kind::Float, device)));
        let rows = w.size()[0];
        for s in (0..total).step_by(chunk.max(1) as usize) {
            let m = chunk.min(total - s);
            // The chunk's logits are one [rows, vocab/N] tensor, worked on
            // in place from the max on: the largest buffer of the loss (one
            // more lives while its exponentials are summed).
            let mut logits = xs
                .rows
                .narrow(0, s, m)
                .linear::<Tensor>(&w, None)
                .to_kind(Kind::Float);
            let local_max = if rows > 0 {
                logits.amax([1].as_slice(), false)
            } else {
                Tensor::full([m], f64::NEG_INFINITY, (Kind::Float, device))
            };
            let max = g.all_gather(&local_max)?.amax([0].as_slice(), false);
            let t = ts.narrow(0, s, m) - start;
            let mine = t.ge(0).logical_and(&t.lt(rows));
            let t = t.clamp(0, (rows - 1).max(0)).unsqueeze(1);
            let target_logit = if rows > 0 {
                logits
                    .gather(1, &t, false)
                    .squeeze_dim(1)
                    .masked_fill(&mine.logical_not(), 0.0)
            } else {
                Tensor::zeros([m], (Kind::Float, device))
            };
            // logit - max, in place.
            let _ = logits.f_sub_(&max.unsqueeze(1))?;
            let mut sums = Tensor::cat(
                &[
                    logits
                        .exp()
                        .sum_dim_intlist([1].as_slice(), false, Kind::Float),
                    target_logit,
                ],
                0,
            );
            g.all_reduce_sum(&mut sums)?;
            let (sum_exp, target) = (sums.narrow(0, 0, m), sums.narrow(0, m, m));
            let lse = &max + sum_exp.log();
            let keep = real.narrow(0, s, m);
            losses
                .narrow(0, s, m)
                .copy_(&(&lse - target).masked_fill(&keep.logical_not(), 0.0));
            if let (Some(scale), Some(grads)) = (scale, &grads) {
                // d loss / d logits = softmax - one-hot(target), in place.
                let minus = mine.to_kind(Kind::Float).neg().unsqueeze(1);
                let _ = logits
                    .f_sub_(&sum_exp.log().unsqueeze(1))?
                    .exp_()
                    .scatter_add_(1, &t, &minus)
                    .masked_fill_(&keep.logical_not().unsqueeze(1), 0.0);
                let part = if w.kind() == Kind::Float {
                    logits.mm(&w) / scale
                } else {
                    (logits * (1.0 / scale))
                        .to_kind(w.kind())
                        .mm(&w)
                        .to_kind(Kind::Float)
                };
                grads.narrow(0, s, m).copy_(&part);
            }
        }
        if let Some(grads) = &grads {
            let mut grads = grads.shallow_clone();
            g.all_reduce_sum(&mut grads)?;
        }
        let me = g.rank() as i64;
        let n = x.size()[0];
        let own = |t: &Tensor| t.narrow(0, me * xs.width, n);
        let loss = own(&losses).sum(Kind::Float).double_value(&[]);
        Ok((loss, grads.map(|g| own(&g).to_kind(x.kind()))))
    }
}
