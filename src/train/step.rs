//! One optimizer step: the micro-batches of the step and their seeds, the
//! forward and backward pass of each, the loss-point regularizers, and the
//! update with its policy for gradients that are not finite.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::loss::chunked_cross_entropy_with;
use super::optim::{self, clip_grads, grad_norm, lr_at};
use super::router_loss::LoadBalancing;
use super::{LossScaler, Trainer};
use crate::data::Batch;
use crate::models::{Checkpointing, LlamaForCausalLM};
use peft_regularizers::rng::mix;
use peft_regularizers::{HookContext, HookPoint, RegularizerStack, StackHooks};

/// Separates the per-example seeds of a step from its micro-batch seeds.
const ROW_SALT: u64 = 0x5eed_0fe8_a391_e5a1;

/// One optimizer step's numbers.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean cross-entropy over the step's label tokens (plus loss-point regularizers).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens in the step.
    pub tokens: i64,
    /// True when the update was skipped (fp16 overflow; the loss scale was lowered).
    pub skipped: bool,
    /// The signal every rank agreed to stop on after this step, if any
    /// rank received one.
    pub stop: Option<i32>,
    /// The router's load-balancing loss, averaged over this process's
    /// micro-batches, when it is part of the loss (`loss` includes it times
    /// `router_aux_loss_coef` once per micro-batch).
    pub router_aux_loss: Option<f64>,
}

/// How [`forward_backward`] runs.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    /// Whether each decoder layer is recomputed in the backward pass, and
    /// which frozen products the recompute replays.
    pub checkpointing: Checkpointing,
    /// Rows of logits per cross-entropy chunk.
    pub loss_chunk_size: i64,
    /// Add the router's load-balancing loss times this (a mixture of experts
    /// with `output_router_logits`; transformers' `router_aux_loss_coef`).
    pub router_aux_loss_coef: Option<f64>,
}

/// Which micro-batch of which step is computed, and how its loss is scaled.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// The optimizer step (0-based).
    pub step: u64,
    /// This micro-batch's index within the step.
    pub index: usize,
    /// Micro-batches in the step.
    pub count: usize,
    /// Seed of this micro-batch's draws (dropout).
    pub seed: u64,
    /// One seed per row for draws that belong to the example (NEFTune's
    /// noise); empty where rows have none.
    pub row_seeds: Vec<u64>,
    /// The step's label tokens: each micro-batch's summed cross-entropy is divided by it.
    pub denom: f64,
    /// Multiplies what is backpropagated (fp16 loss scaling; 1 otherwise).
    pub loss_scale: f64,
}

impl MicroBatch {
    /// The only micro-batch of `step` (index 0 of 1), with seed 1 and no
    /// row seeds: what a hand-built batch (a test's, a benchmark's) is.
    /// `denom` is the step's label tokens, `loss_scale` 1 without fp16.
    pub fn single(step: u64, denom: f64, loss_scale: f64) -> Self {
        Self {
            step,
            index: 0,
            count: 1,
            seed: 1,
            row_seeds: Vec::new(),
            denom,
            loss_scale,
        }
    }
}

impl Trainer {
    /// One optimizer step: forward and backward on each micro-batch (the loss
    /// normalised by the step's label tokens, as transformers' Trainer does),
    /// the sum over ranks, the loss-point regularizers once, then the update
    /// ([`Trainer::update`]).
    pub fn train_step(&mut self, step: u64) -> Result<StepStats> {
        let (batches, label_tokens, tokens) = self.batches_for_step(step);
        let denom = label_tokens.max(1) as f64;
        let loss_scale = self.scaler.as_ref().map_or(1.0, LossScaler::scale);
        let opts = StepOptions {
            checkpointing: self.cfg.checkpointing_mode(),
            loss_chunk_size: self.cfg.loss_chunk_size,
            router_aux_loss_coef: self.router_aux_loss_coef,
        };
        let mut loss = 0.0;
        let mut aux = Vec::new();
        self.idle_fsdp_passes(step, batches.len(), opts.checkpointing.is_on())?;
        for (micro, (batch, rows)) in batches.iter().enumerate() {
            let mb = MicroBatch {
                index: micro,
                count: batches.len(),
                seed: self.micro_batch_seed(step, micro),
                row_seeds: self.row_seeds(step, rows),
                ..MicroBatch::single(step, denom, loss_scale)
            };
            let part = forward_backward_parts(
                &self.model,
                &mut self.regs,
                &self.trainable,
                batch,
                &mb,
                opts,
            )?;
            self.model.fsdp_error()?;
            loss += part.loss;
            aux.extend(part.router_aux_loss);
        }
        if let Some(gs) = &self.grad_shards {
            gs.hand_over();
        }
        let (loss, stop) = self.all_reduce(loss, step)?;
        let whole_step = MicroBatch {
            index: batches.len().saturating_sub(1),
            count: batches.len().max(1),
            seed: mix(self.cfg.seed, step),
            ..MicroBatch::single(step, denom, loss_scale)
        };
        let loss = apply_loss_regularizers(
            &mut self.regs,
            &self.trainable,
            loss,
            &whole_step,
            self.model.device(),
        )?;
        let mut stats = self.update(step, loss, loss_scale)?;
        stats.tokens = tokens;
        stats.stop = stop;
        stats.router_aux_loss =
            (!aux.is_empty()).then(|| aux.iter().sum::<f64>() / aux.len() as f64);
        Ok(stats)
    }

    /// With a sharded base (`--fsdp`), the gathers of the step's
    /// micro-batches this rank has no rows for (the last, short batch of an
    /// epoch), so that every rank runs the same gathers; and the step is
    /// announced for a failure's diagnosis.
    fn idle_fsdp_passes(&mut self, step: u64, local: usize, recompute: bool) -> Result<()> {
        let (Some(_), Some(g)) = (self.model.fsdp(), self.group.as_deref()) else {
            return Ok(());
        };
        g.at(&format!("the layer gathers of step {}", step + 1))?;
        let global = self.plan.micro_batches(step).1.count();
        for _ in local..global {
            self.model
                .fsdp_idle_pass(true, recompute, self.cfg.loss_chunk_size);
        }
        self.model.fsdp_error()
    }

    /// The seed of micro-batch `micro`'s draws (dropout): each rank draws
    /// its own, and rank 0 draws what a single process draws.
    fn micro_batch_seed(&self, step: u64, micro: usize) -> u64 {
        let seed = mix(mix(self.cfg.seed, step), micro as u64);
        match self.rank_and_world().0 {
            0 => seed,
            r => mix(seed, r as u64),
        }
    }

    /// The seeds of the rows (data-set indices `rows`) of a micro-batch:
    /// an example's own draws (NEFTune's noise) follow the example, not the
    /// split over micro-batches and ranks.
    fn row_seeds(&self, step: u64, rows: &[usize]) -> Vec<u64> {
        let salt = mix(mix(self.cfg.seed, step), ROW_SALT);
        rows.iter().map(|&j| mix(salt, j as u64)).collect()
    }

    /// The step's loss and the signal every rank stops on after it: summed
    /// over the ranks with the gradients ([`crate::dist::reduce`]); a single
    /// process's own.
    fn all_reduce(&mut self, loss: f64, step: u64) -> Result<(f64, Option<i32>)> {
        let pending = crate::signals::pending();
        let Some(group) = self.group.as_deref() else {
            return Ok((loss, pending));
        };
        // Sharded gradients were summed layer by layer; the rest are summed here.
        let params = self
            .grad_shards
            .as_ref()
            .map_or(&self.params, |gs| &gs.rest);
        let r = crate::dist::reduce::all_reduce_gradients(group, params, loss, pending, step)?;
        self.wait_seconds += r.waited_seconds;
        self.all_reduce_seconds += r.moved_seconds;
        Ok((r.loss, r.stop))
    }

    /// The update once the gradients are complete: unscaled (fp16), checked,
    /// clipped and applied, then cleared. Non-finite gradients never reach
    /// the adapter: with fp16 the step is skipped and the loss scale halved
    /// (torch's GradScaler); otherwise the run stops with the step number.
    fn update(&mut self, step: u64, loss: f64, loss_scale: f64) -> Result<StepStats> {
        if !loss.is_finite() && self.scaler.is_none() {
            bail!("the loss became {loss} at step {}; stopping (the last complete checkpoint is kept)", step + 1);
        }
        let lr = lr_at(
            self.cfg.lr_scheduler_type,
            self.cfg.learning_rate,
            step,
            self.warmup,
            self.total_steps,
        );
        if loss_scale != 1.0 {
            optim::scale_grads(&self.params, 1.0 / loss_scale);
        }
        let norm = match (&self.grad_shards, self.group.as_deref()) {
            (Some(gs), Some(g)) => gs.grad_norm(g)?,
            _ => grad_norm(&self.params),
        };
        let stats = |skipped| StepStats {
            loss,
            lr,
            grad_norm: norm,
            tokens: 0,
            skipped,
            stop: None,
            router_aux_loss: None,
        };
        if !norm.is_finite() || !loss.is_finite() {
            self.zero_grads();
            let Some(scaler) = self.scaler.as_mut() else {
                bail!(
                    "the gradient norm became {norm} at step {}; stopping before the update, \
                     so no non-finite weight is applied or saved (the last complete checkpoint is kept)",
                    step + 1
                );
            };
            scaler.update(true);
            self.skipped_steps += 1;
            return Ok(stats(true));
        }
        clip_grads(&self.params, self.cfg.max_grad_norm, norm);
        self.optim.step(&self.params, lr);
        if let (Some(z), Some(g)) = (&self.optim_shards, self.group.as_deref()) {
            z.share_params(g, &self.params)?;
        }
        self.zero_grads();
        if let Some(s) = self.scaler.as_mut() {
            s.update(false);
        }
        Ok(stats(false))
    }
}

/// Forward and backward of one micro-batch, accumulating into the adapters'
/// `.grad` (times `mb.loss_scale`); returns its share of the step loss
/// (cross-entropy summed over its label tokens, divided by `mb.denom`, plus
/// the router's load-balancing loss times its coefficient when asked).
pub fn forward_backward(
    model: &LlamaForCausalLM,
    regs: &mut RegularizerStack,
    trainable: &[(String, Tensor)],
    batch: &Batch,
    mb: &MicroBatch,
    opts: StepOptions,
) -> Result<f64> {
    forward_backward_parts(model, regs, trainable, batch, mb, opts).map(|l| l.loss)
}

/// What [`forward_backward_parts`] computed for one micro-batch.
#[derive(Debug, Clone, Copy)]
pub struct MicroBatchLoss {
    /// Its share of the step loss, the load-balancing loss (times its
    /// coefficient) included.
    pub loss: f64,
    /// The router's load-balancing loss (transformers' `aux_loss`), when it
    /// was added.
    pub router_aux_loss: Option<f64>,
}

/// [`forward_backward`], with the parts of the loss.
///
/// The load-balancing loss is added per micro-batch, as transformers' model
/// adds it to each forward pass's loss and the Trainer backpropagates each:
/// with gradient accumulation (and across ranks) its gradients add up.
pub fn forward_backward_parts(
    model: &LlamaForCausalLM,
    regs: &mut RegularizerStack,
    trainable: &[(String, Tensor)],
    batch: &Batch,
    mb: &MicroBatch,
    opts: StepOptions,
) -> Result<MicroBatchLoss> {
    let device = model.device();
    let ids = batch.input_ids.to_device(device);
    let labels = batch.labels.to_device(device);
    let mask = batch.attention_mask.to_device(device);
    let segments = batch.segment_ids.as_ref().map(|s| s.to_device(device));
    let mut hooks = StackHooks {
        regs,
        ctx: HookContext {
            training: true,
            step: mb.step,
            attention_mask: &mask,
            segment_ids: segments.as_ref(),
            seed: mb.seed,
            row_seeds: (!mb.row_seeds.is_empty()).then_some(&mb.row_seeds[..]),
            micro_batch: mb.index,
            micro_batches: mb.count,
            trainable,
        },
    };
    let input = batch.decoder_input(&ids, segments.as_ref());
    // Forward (with checkpointing, only the layers' inputs are kept), then the
    // cross-entropy in chunks, each backpropagated at once.
    let out = model.decode(&input, None, &mut hooks, opts.checkpointing);
    // A sharded base's head is gathered for the whole loss (`--fsdp`).
    let head = model.gather_head(opts.checkpointing.is_on());
    let balance = opts
        .router_aux_loss_coef
        .zip(model.config.moe.as_ref())
        .and_then(|(coef, moe)| {
            let lb = LoadBalancing::new(&out.router_logits, &mask, moe.num_experts_per_tok as i64)?;
            Some((coef, lb))
        });
    let router_term = |logits: &Tensor| match &balance {
        Some((coef, lb)) => lb.layer_term(logits) * (coef * mb.loss_scale),
        None => Tensor::zeros([], (Kind::Float, device)),
    };
    // Without checkpointing the router logits still hold their graph: the
    // load-balancing loss goes backward with the cross-entropy, in one pass.
    let also = match (&balance, &out.recompute) {
        (Some(_), None) => out
            .router_logits
            .iter()
            .map(router_term)
            .reduce(|a, b| a + b),
        _ => None,
    };
    let ce_sum = chunked_cross_entropy_with(
        model,
        &out.hidden,
        &labels,
        opts.loss_chunk_size,
        Some(mb.denom / mb.loss_scale),
        also,
    )?;
    drop(head);
    // With checkpointing, the gradient stopped at the last layer's output:
    // rebuild each layer and backpropagate through it (and through its
    // share of the load-balancing loss, whose counts the forward pass fixed).
    if let Some(r) = out.recompute {
        let router_loss: Option<&dyn Fn(&Tensor) -> Tensor> =
            balance.as_ref().map(|_| &router_term as _);
        r.backward(model, &mut hooks, router_loss);
    }
    let router_aux_loss = balance.as_ref().map(|(_, lb)| lb.value());
    let weighted = balance.as_ref().map_or(0.0, |(coef, lb)| coef * lb.value());
    Ok(MicroBatchLoss {
        loss: ce_sum / mb.denom + weighted,
        router_aux_loss,
    })
}

/// Runs the loss-point regularizers once for the whole step: they receive
/// the step's loss (the sum of the micro-batches' shares) and whatever they
/// add is backpropagated (times the loss scale). Returns the new step loss.
pub fn apply_loss_regularizers(
    regs: &mut RegularizerStack,
    trainable: &[(String, Tensor)],
    loss: f64,
    mb: &MicroBatch,
    device: tch::Device,
) -> Result<f64> {
    if !regs.wants(HookPoint::Loss, true) {
        return Ok(loss);
    }
    let mask = Tensor::zeros([0, 0], (Kind::Int64, device));
    let ctx = HookContext {
        training: true,
        step: mb.step,
        attention_mask: &mask,
        segment_ids: None,
        seed: mb.seed,
        row_seeds: None,
        micro_batch: mb.index,
        micro_batches: mb.count,
        trainable,
    };
    let value = Tensor::from(loss).to_device(device);
    let l = regs.apply(HookPoint::Loss, value, &ctx);
    if l.requires_grad() {
        (&l * mb.loss_scale).backward();
    }
    Ok(l.double_value(&[]))
}
