//! The evaluation loss: mean cross-entropy per label token, with training-only
//! regularizers and dropout off, sharded over the ranks of a multi-process run.

use anyhow::{bail, Result};
use tch::Tensor;

use super::loss::chunked_cross_entropy;
use super::Trainer;
use crate::data::{self, Dataset};
use crate::models::LlamaForCausalLM;
use crate::peft_model;
use peft_regularizers::{HookContext, RegularizerStack, StackHooks};

impl Trainer {
    /// Mean cross-entropy over the evaluation data, with training-only
    /// regularizers and dropout off. With several processes each evaluates
    /// its share of the records and the sums are added up, so every rank
    /// returns the mean over the whole set.
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        let Some(eval) = &self.eval else {
            return Ok(None);
        };
        let (rank, world) = self.rank_and_world();
        peft_model::set_training(&mut self.model, false);
        let r = loss_sum(
            &self.model,
            eval,
            (rank, world),
            self.cfg.per_device_train_batch_size * 2,
            self.pad_id,
            self.cfg.loss_chunk_size,
            &mut self.regs,
        );
        peft_model::set_training(&mut self.model, true);
        let (mut sum, mut count) = r?;
        if let Some(group) = &self.group {
            let mut t = Tensor::from_slice(&[sum, count as f64]).to_device(self.model.device());
            group.all_reduce_sum(&mut t)?;
            (sum, count) = (t.double_value(&[0]), t.double_value(&[1]) as i64);
        }
        if count == 0 {
            bail!("{}: no label tokens to evaluate", eval.path.display());
        }
        Ok(Some(sum / count as f64))
    }
}

/// Mean cross-entropy per label token over a dataset, without gradients.
pub fn mean_loss(
    model: &LlamaForCausalLM,
    ds: &Dataset,
    batch_size: usize,
    pad_id: i64,
    chunk: i64,
    regs: &mut RegularizerStack,
) -> Result<f64> {
    let (sum, count) = loss_sum(model, ds, (0, 1), batch_size, pad_id, chunk, regs)?;
    if count == 0 {
        bail!("{}: no label tokens to evaluate", ds.path.display());
    }
    Ok(sum / count as f64)
}

/// Summed cross-entropy and label tokens over share `rank` of `world` of a
/// dataset (the records sorted by length, then cut into `world` runs).
fn loss_sum(
    model: &LlamaForCausalLM,
    ds: &Dataset,
    (rank, world): (usize, usize),
    batch_size: usize,
    pad_id: i64,
    chunk: i64,
    regs: &mut RegularizerStack,
) -> Result<(f64, i64)> {
    let _g = tch::no_grad_guard();
    let device = model.device();
    // Sorted by length: little padding, and the result does not depend on order.
    let mut order: Vec<usize> = (0..ds.examples.len()).collect();
    order.sort_by_key(|&i| ds.examples[i].input_ids.len());
    let mine = &order[crate::dist::shard(order.len(), rank, world)];
    // A sharded base (`--fsdp`): every rank runs as many passes as rank 0,
    // which has the most records, so that the layer gathers pair up.
    if model.fsdp().is_some() {
        let most = crate::dist::shard(order.len(), 0, world)
            .len()
            .div_ceil(batch_size);
        for _ in mine.len().div_ceil(batch_size)..most {
            model.fsdp_idle_pass(false, false, chunk);
        }
    }
    let (mut sum, mut count) = (0.0, 0i64);
    for chunk_idx in mine.chunks(batch_size) {
        let ex: Vec<&data::Example> = chunk_idx.iter().map(|&i| &ds.examples[i]).collect();
        let b = data::collate(&ex, pad_id);
        let mask = b.attention_mask.to_device(device);
        let ids = b.input_ids.to_device(device);
        let mut hooks = StackHooks {
            regs: &mut *regs,
            ctx: HookContext {
                training: false,
                step: 0,
                attention_mask: &mask,
                segment_ids: None,
                seed: 0,
                row_seeds: None,
                micro_batch: 0,
                micro_batches: 1,
                trainable: &[],
            },
        };
        let hidden = model.forward_hidden(&b.decoder_input(&ids, None), None, &mut hooks);
        let head = model.gather_head(false);
        sum += chunked_cross_entropy(model, &hidden, &b.labels.to_device(device), chunk, None)?;
        drop(head);
        count += b.num_label_tokens;
    }
    model.fsdp_error()?;
    Ok((sum, count))
}
