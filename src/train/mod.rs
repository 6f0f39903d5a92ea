//! `peft-rs train`: LoRA fine-tuning of a frozen base with pluggable regularizers.
//!
//! The run is: set up (model, data, adapters, regularizers, optimizer, resume)
//! → for each step, [`Trainer::train_step`] → evaluate and checkpoint on
//! schedule → save the adapter. Everything random (adapter init, data order,
//! dropout, NEFTune noise) is derived from `seed` and the step, so the same
//! settings give the same loss curve, and a resumed run continues it exactly.

pub mod checkpoint;
pub mod config;
pub mod optim;

pub mod plan;
pub mod scaler;
pub mod settings_file;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tch::{Kind, Reduction, Tensor};

pub use checkpoint::TrainerState;
pub use config::{Schedule, TrainConfig};
pub use plan::EpochPlan;
pub use scaler::LossScaler;

use crate::data::{self, Batch, DataOptions, Dataset};
use crate::device::resolve_model_dir;
use crate::dist::agree;
use crate::models::llama::ForwardHooks;
use crate::models::{LlamaForCausalLM, Pretrained};
use crate::outputs;
use crate::peft_model::{self, DEFAULT_ADAPTER};
use crate::signals::{self, Interrupted};
use optim::{clip_grads, grad_norm, lr_at, AdamW};
use peft_adapters::lora::LoraConfig;
use peft_regularizers::rng::{mix, with_torch_seed};

/// Separates the per-example seeds of a step from its micro-batch seeds.
const ROW_SALT: u64 = 0x5eed_0fe8_a391_e5a1;
use peft_regularizers::{HookContext, HookPoint, Neftune, Regularizer, RegularizerStack};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Optimizer steps taken in total (including before a resume).
    pub steps: u64,
    /// Steps skipped because fp16 gradients overflowed (loss scaling).
    pub skipped_steps: u64,
    /// Training loss of the last step (measured with regularizers on).
    pub final_train_loss: f64,
    /// Evaluation loss before the first step, if there is eval data.
    pub eval_loss_before: Option<f64>,
    /// Evaluation loss at the end.
    pub eval_loss_after: Option<f64>,
    /// Wall time of this process's training loop.
    pub seconds: f64,
    /// Real (non-pad) tokens processed per second.
    pub tokens_per_second: f64,
    /// Where the adapter was written.
    pub output: PathBuf,
    /// Bytes of the frozen base weights in memory (quantized layers as stored).
    pub frozen_weight_bytes: usize,
    /// Bytes per parameter of the quantized linear layers, when there are some.
    pub quantized_bytes_per_param: Option<f64>,
}

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
}

/// A training run in progress.
pub struct Trainer {
    /// The settings (`model` resolved to the directory actually loaded).
    pub cfg: TrainConfig,
    /// The base with adapters attached.
    pub model: LlamaForCausalLM,
    /// The adapter's configuration as saved.
    pub lora: LoraConfig,
    regs: RegularizerStack,
    params: BTreeMap<String, Tensor>,
    trainable: Vec<(String, Tensor)>,
    optim: AdamW,
    scaler: Option<LossScaler>,
    skipped_steps: u64,
    train: Dataset,
    eval: Option<Dataset>,
    pad_id: i64,
    order_cache: Option<(u64, Vec<Vec<usize>>)>,
    /// How optimizer steps map to epochs and micro-batches.
    pub plan: EpochPlan,
    /// Optimizer steps per run.
    pub total_steps: u64,
    warmup: u64,
    /// Held by the one process that writes (rank 0, or the only process).
    _lock: Option<outputs::OutputLock>,
    /// The c10d process group of a multi-process run.
    group: Option<crate::dist::ProcessGroup>,
    /// Time spent in the gradient all-reduce, after every rank arrived.
    pub all_reduce_seconds: f64,
    /// Time spent waiting for the slowest rank before it.
    pub wait_seconds: f64,
}

impl Trainer {
    /// Loads the base, the data and fresh adapters; adds NEFTune when
    /// `neftune_noise_alpha > 0` and then `extra` regularizers, in that order.
    pub fn new(mut cfg: TrainConfig, extra: Vec<Box<dyn Regularizer>>) -> Result<Self> {
        cfg.validate()?;
        if cfg.tf32 {
            crate::device::allow_tf32();
        }
        // Where this process sits decides its device (cuda:LOCAL_RANK), so
        // the process group is described before the device is chosen.
        let dist = crate::dist::DistEnv::from_env()?;
        if let Some(d) = &dist {
            d.check_master()?;
        }
        let place = crate::device::Placement::resolve_for(
            cfg.device,
            cfg.dtype,
            dist.as_ref().map(crate::dist::DistEnv::local),
        )?;
        let (device, kind) = (place.device, place.kind);
        // training_args.json records what was used, not "auto"; with several
        // processes each takes its own GPU, which `cuda` says.
        (cfg.device, cfg.dtype) = place.recorded(dist.is_some());
        let writer = dist.as_ref().is_none_or(|d| d.rank == 0);
        if writer {
            eprintln!("training on {}", place.describe());
        }
        let model_dir = resolve_model_dir(cfg.model.clone())?;
        cfg.model = Some(model_dir.clone());
        let Some(data_path) = cfg.data.clone() else {
            bail!("no training data: pass --data FILE (Alpaca JSON, or JSONL with messages, prompt/completion or text)");
        };
        // Claimed before anything slow, so that a second writer fails at once.
        let mut inputs = vec![
            ("base model", model_dir.as_path()),
            ("training data", data_path.as_path()),
        ];
        if let Some(e) = &cfg.eval_data {
            inputs.push(("evaluation data", e.as_path()));
        }
        outputs::refuse_overlap("--output", &cfg.output, &inputs)?;
        let group = match &dist {
            Some(env) => Some(join_process_group(&cfg, env, device)?),
            None => None,
        };
        // One writer: rank 0 owns the output; the other ranks only read it (resume).
        let lock = match writer {
            false => None,
            true => Some(outputs::claim_dir("--output", &cfg.output, "train")?),
        };
        let quantize = cfg.quantization(kind, device);
        let base = Pretrained::load_quantized(&model_dir, kind, device, quantize.as_ref())?;
        let eos = base.completion_eos()?;
        let opts = DataOptions {
            format: cfg.format,
            max_seq_len: cfg.max_seq_length,
            train_on_prompt: cfg.train_on_prompt,
        };
        let mut train = data::load_dataset(&data_path, &base.tokenizer, eos, &opts)?;
        let eval = match (&cfg.eval_data, cfg.eval_holdout) {
            (Some(p), _) => Some(data::load_dataset(p, &base.tokenizer, eos, &opts)?),
            (None, 0) => None,
            (None, n) => {
                if n >= train.examples.len() {
                    bail!(
                        "--eval-holdout {n} leaves no training data ({} examples)",
                        train.examples.len()
                    );
                }
                let (t, e) = data::split_holdout(train, n, cfg.seed);
                train = t;
                Some(e)
            }
        };
        if cfg.packing {
            train.examples = data::pack(std::mem::take(&mut train.examples), cfg.max_seq_length);
        }
        let pad_id = base.tokenizer.pad_token_id().map(i64::from).unwrap_or(eos);
        let mut model = base.model;
        let lora = cfg.lora_config(&model_dir);
        with_torch_seed(cfg.seed, || {
            peft_model::inject(&mut model, DEFAULT_ADAPTER, &lora)
        })?;
        peft_model::set_training(&mut model, true);
        peft_model::set_compute_kind(&mut model, cfg.lora_compute_dtype.resolve(tch::Device::Cpu));
        peft_model::set_dropout_sharing(&mut model, cfg.share_lora_dropout);
        let params = peft_model::trainable_parameters(&model);
        let trainable = params
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        let optim = AdamW::new(
            &params,
            (cfg.adam_beta1, cfg.adam_beta2),
            cfg.adam_epsilon,
            cfg.weight_decay,
        );
        let mut regs = RegularizerStack::new();
        if cfg.neftune_noise_alpha > 0.0 {
            regs.push(Box::new(Neftune {
                alpha: cfg.neftune_noise_alpha,
                mode: cfg.neftune_mode,
                noise: cfg.neftune_noise,
            }));
        }
        for r in extra {
            regs.push(r);
        }
        // A batch is --batch-size rows on each rank.
        let world_size = group.as_ref().map_or(1, |g| g.world_size());
        let plan = EpochPlan {
            batches_per_epoch: train
                .examples
                .len()
                .div_ceil(cfg.per_device_train_batch_size * world_size)
                as u64,
            gradient_accumulation_steps: cfg.gradient_accumulation_steps as u64,
        };
        let total_steps = plan.total_steps(cfg.num_train_epochs, cfg.max_steps);
        let warmup = if !cfg.lr_scheduler_type.has_warmup() {
            0
        } else if cfg.warmup_steps > 0 {
            cfg.warmup_steps
        } else {
            (cfg.warmup_ratio * total_steps as f64).ceil() as u64
        };
        // fp16 gradients underflow without loss scaling (torch's GradScaler);
        // bf16 has fp32's range and needs none.
        let scaler = (kind == Kind::Half).then(LossScaler::default);
        // Before the first collective whose size depends on the settings.
        if let Some(g) = &group {
            let settings = settings_to_agree_on(&cfg, &model_dir, &train, eval.as_ref())?;
            agree::agree_on_settings(g, &settings)?;
        }
        Ok(Self {
            _lock: lock,
            group,
            all_reduce_seconds: 0.0,
            wait_seconds: 0.0,
            cfg,
            model,
            lora,
            regs,
            params,
            trainable,
            optim,
            scaler,
            skipped_steps: 0,
            train,
            eval,
            pad_id,
            order_cache: None,
            plan,
            total_steps,
            warmup,
        })
    }

    /// The micro-batches of optimizer step `step`: a pure function of
    /// (seed, step), which is what makes resume exact.
    ///
    /// With several ranks, each global batch (`--batch-size` x world size
    /// examples) is split into contiguous shards, one per rank; the returned
    /// counts are those of the whole global step, which every rank knows
    /// without communicating: (local micro-batches, label tokens, tokens).
    /// This rank's micro-batches of `step`, each with the data-set indices of
    /// its rows, and the whole step's label tokens and tokens over all ranks.
    fn batches_for_step(&mut self, step: u64) -> (Vec<(Batch, Vec<usize>)>, i64, i64) {
        let (rank, world) = self.rank_and_world();
        let bs = self.cfg.per_device_train_batch_size * world;
        let (epoch, range) = self.plan.micro_batches(step);
        if self.order_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let lengths: Vec<usize> = self
                .train
                .examples
                .iter()
                .map(|e| e.input_ids.len())
                .collect();
            let order =
                data::batch_order(&lengths, bs, self.cfg.group_by_length, self.cfg.seed, epoch);
            self.order_cache = Some((epoch, order));
        }
        let order = &self.order_cache.as_ref().expect("set above").1;
        let (mut label_tokens, mut tokens) = (0, 0);
        let batches = range
            .filter_map(|i| {
                let global = &order[i as usize];
                for &j in global {
                    let e = &self.train.examples[j];
                    tokens += e.input_ids.len() as i64;
                    label_tokens += e.num_label_tokens() as i64;
                }
                let mine = crate::dist::shard(global.len(), rank, world);
                let examples: Vec<&data::Example> = global[mine.clone()]
                    .iter()
                    .map(|&j| &self.train.examples[j])
                    .collect();
                (!examples.is_empty())
                    .then(|| (data::collate(&examples, self.pad_id), global[mine].to_vec()))
            })
            .collect();
        (batches, label_tokens, tokens)
    }

    /// Whether this process writes the outputs (rank 0 or a single process).
    fn is_writer(&self) -> bool {
        self._lock.is_some()
    }

    /// This process's rank and the number of processes (0 and 1 alone).
    pub fn rank_and_world(&self) -> (usize, usize) {
        self.group
            .as_ref()
            .map_or((0, 1), |g| (g.rank(), g.world_size()))
    }

    /// Sums every adapter gradient and the loss over the ranks, in one flat
    /// fp32 bucket (LoRA gradients are a few MB), with each rank's stop
    /// request (the first signal it received) in three more slots. Each
    /// rank's loss was already divided by the global number of label
    /// tokens, so the sum is the gradient of the whole step's mean loss, as
    /// on one process; and every rank learns the same stop decision.
    /// Returns the step's loss and the signal all ranks stop on after it.
    fn all_reduce_gradients(&mut self, loss: f64, step: u64) -> Result<(f64, Option<i32>)> {
        let pending = signals::pending();
        let Some(group) = self.group.as_mut() else {
            return Ok((loss, pending));
        };
        // A rank without rows this step (the last, short batch) has no
        // gradients yet; give it zeros so that it takes the same update.
        if self.params.values().any(|p| !p.grad().defined()) {
            let zero = self
                .params
                .values()
                .map(|p| (p * 0.0).sum(Kind::Float))
                .reduce(|a, b| a + b);
            if let Some(z) = zero {
                z.backward();
            }
        }
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .params
            .values()
            .map(|p| p.grad().to_kind(Kind::Float).flatten(0, -1))
            .collect();
        let device = grads.first().map_or(tch::Device::Cpu, Tensor::device);
        let mut parts = grads;
        let mut tail = vec![loss as f32];
        tail.extend(agree::stop_vote(pending).map(|v| v as f32));
        parts.push(Tensor::from_slice(&tail).to_device(device));
        let mut bucket = Tensor::cat(&parts, 0);
        group.at(&format!("the gradient all-reduce of step {}", step + 1))?;
        // Waiting for the slowest rank and moving the bytes are timed apart:
        // the first is load imbalance, the second the cost of communication.
        let t = std::time::Instant::now();
        group.barrier()?;
        self.wait_seconds += t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        group.all_reduce_sum(&mut bucket)?;
        self.all_reduce_seconds += t.elapsed().as_secs_f64();
        let mut offset = 0;
        for p in self.params.values() {
            let n = p.numel() as i64;
            let summed = bucket.narrow(0, offset, n).view(p.size().as_slice());
            p.grad().copy_(&summed);
            offset += n;
        }
        let tail = Vec::<f32>::try_from(&bucket.narrow(0, offset, 1 + agree::STOP_SLOTS as i64))?;
        let votes: Vec<f64> = tail[1..].iter().map(|&v| f64::from(v)).collect();
        Ok((f64::from(tail[0]), agree::agreed_stop(&votes)))
    }

    /// One optimizer step: forward and backward on each micro-batch (the loss
    /// normalised by the step's label tokens, as transformers' Trainer does),
    /// the loss-point regularizers once, then a check that the gradients are
    /// finite, clipping, the update, and clearing the gradients.
    ///
    /// Non-finite gradients never reach the adapter: with fp16 the step is
    /// skipped and the loss scale halved (torch's GradScaler); otherwise the
    /// run stops with the step number.
    pub fn train_step(&mut self, step: u64) -> Result<StepStats> {
        let (batches, label_tokens, tokens) = self.batches_for_step(step);
        let denom = label_tokens.max(1) as f64;
        let rank = self.group.as_ref().map_or(0, |g| g.rank()) as u64;
        let loss_scale = self.scaler.as_ref().map_or(1.0, LossScaler::scale);
        let step_seed = mix(self.cfg.seed, step);
        let opts = StepOptions {
            gradient_checkpointing: self.cfg.gradient_checkpointing,
            loss_chunk_size: self.cfg.loss_chunk_size,
        };
        let mut loss = 0.0;
        for (micro, (batch, rows)) in batches.iter().enumerate() {
            let mb = MicroBatch {
                step,
                index: micro,
                count: batches.len(),
                // Each rank draws its own dropout and noise; rank 0 draws
                // what a single process draws.
                seed: match rank {
                    0 => mix(step_seed, micro as u64),
                    r => mix(mix(step_seed, micro as u64), r),
                },
                // An example's own draws follow the example, not the split.
                row_seeds: rows
                    .iter()
                    .map(|&j| mix(mix(step_seed, ROW_SALT), j as u64))
                    .collect(),
                denom,
                loss_scale,
            };
            loss += forward_backward(
                &self.model,
                &mut self.regs,
                &self.trainable,
                batch,
                &mb,
                opts,
            )?;
        }
        let stop;
        (loss, stop) = self.all_reduce_gradients(loss, step)?;
        loss = apply_loss_regularizers(
            &mut self.regs,
            &self.trainable,
            loss,
            &MicroBatch {
                step,
                index: batches.len().saturating_sub(1),
                count: batches.len().max(1),
                seed: step_seed,
                row_seeds: Vec::new(),
                denom,
                loss_scale,
            },
            self.model.device(),
        )?;
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
        let norm = grad_norm(&self.params);
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
            return Ok(StepStats {
                loss,
                lr,
                grad_norm: norm,
                tokens,
                skipped: true,
                stop,
            });
        }
        clip_grads(&self.params, self.cfg.max_grad_norm, norm);
        self.optim.step(&self.params, lr);
        self.zero_grads();
        if let Some(s) = self.scaler.as_mut() {
            s.update(false);
        }
        Ok(StepStats {
            loss,
            lr,
            grad_norm: norm,
            tokens,
            skipped: false,
            stop,
        })
    }

    /// Stops the run on `sig`, which every rank agreed on: after `step`
    /// steps rank 0 saves a checkpoint (unless the newest is already that
    /// step's) and every rank waits for it and fails if it failed; with no
    /// step done there is nothing to save. Returns the [`Interrupted`] error
    /// every rank exits with (128 + the signal).
    fn stop_on(&mut self, sig: i32, step: u64, save: bool) -> Result<()> {
        let name = signals::name(sig);
        if !save {
            return Err(Interrupted {
                signal: sig,
                message: format!("stopped by {name} before the first step; nothing to save"),
            }
            .into());
        }
        let saved = if self.is_writer() {
            match checkpoint::list(&self.cfg.output).last() {
                Some((s, d)) if *s == step => Ok(d.clone()),
                _ => self.save_checkpoint(step),
            }
        } else {
            Ok(PathBuf::new())
        };
        let dir = agree::fail_together(self.group.as_ref(), "to save the checkpoint", saved)?;
        let message = match &self.group {
            Some(g) if g.rank() != 0 => {
                let dir = agree::share_from_rank0(g, "stop-checkpoint", &[])?;
                format!(
                    "rank {}: stopped by {name} after step {step} with every rank; rank 0 saved {}",
                    g.rank(),
                    String::from_utf8_lossy(&dir)
                )
            }
            group => {
                if let Some(g) = group {
                    agree::share_from_rank0(
                        g,
                        "stop-checkpoint",
                        dir.display().to_string().as_bytes(),
                    )?;
                }
                format!(
                    "stopped by {name} after step {step} of {}; saved {} — to continue, run the same command with --resume",
                    self.total_steps,
                    dir.display()
                )
            }
        };
        Err(Interrupted {
            signal: sig,
            message,
        }
        .into())
    }

    fn zero_grads(&mut self) {
        for p in self.params.values_mut() {
            p.zero_grad();
        }
    }

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

    /// Refuses to write adapter weights that are not finite.
    fn check_finite(&self) -> Result<()> {
        for (k, p) in &self.params {
            if !bool::try_from(p.isfinite().all())? {
                bail!("adapter tensor {k} holds NaN or inf; refusing to save it");
            }
        }
        Ok(())
    }

    /// Writes the adapter (PEFT format) into `dir`.
    pub fn save_adapter(&mut self, dir: &Path) -> Result<()> {
        self.check_finite()?;
        peft_model::save_adapter(&self.model, DEFAULT_ADAPTER, &self.lora, dir)
    }

    /// The state saved with a checkpoint after `step` steps.
    pub fn state(&self, step: u64) -> TrainerState {
        TrainerState {
            global_step: step,
            epoch: self.plan.epoch_after(step),
            total_steps: self.total_steps,
            skipped_steps: self.skipped_steps,
            loss_scaler: self.scaler.clone(),
            peft_rs_version: env!("CARGO_PKG_VERSION").to_owned(),
            settings: self.cfg.clone(),
            world_size: self.rank_and_world().1,
        }
    }

    fn save_checkpoint(&mut self, step: u64) -> Result<PathBuf> {
        self.check_finite()?;
        if !self.is_writer() {
            return Ok(self.cfg.output.join(format!("checkpoint-{step}")));
        }
        let state = self.state(step);
        let optim = self.optim.state();
        let output = self.cfg.output.clone();
        let model = &mut self.model;
        let lora = &self.lora;
        let dir = checkpoint::save(&output, step, &optim, &state, |d| {
            peft_model::save_adapter(model, DEFAULT_ADAPTER, lora, d)
        })?;
        checkpoint::prune(&output, self.cfg.save_total_limit)?;
        Ok(dir)
    }

    /// Continues from rank 0's newest complete checkpoint; returns the step
    /// to continue from. Rank 0 reads it and checks it against these
    /// settings; the other ranks take what rank 0 read (their own --output
    /// may hold another checkpoint, or none), so that every rank resumes
    /// from the same one. When rank 0 cannot, every rank fails with it.
    fn resume(&mut self) -> Result<u64> {
        let local = if self.is_writer() {
            self.load_newest_checkpoint()
        } else {
            Ok(0)
        };
        let step = agree::fail_together(self.group.as_ref(), "to resume", local)?;
        let Some(g) = &self.group else {
            return Ok(step);
        };
        let mine = Resumed {
            step,
            optimizer_step: self.optim.step,
            skipped_steps: self.skipped_steps,
            loss_scaler: self.scaler.clone(),
        };
        let theirs: Resumed = serde_json::from_slice(&agree::share_from_rank0(
            g,
            "resume",
            &serde_json::to_vec(&mine)?,
        )?)?;
        self.optim.step = theirs.optimizer_step;
        self.skipped_steps = theirs.skipped_steps;
        self.scaler = theirs.loss_scaler;
        let mut tensors: Vec<Tensor> = self.params.values().map(Tensor::shallow_clone).collect();
        tensors.extend(self.optim.moments());
        agree::broadcast_tensors(g, &tensors)?;
        Ok(theirs.step)
    }

    /// Loads the newest complete checkpoint of this rank's --output into
    /// the adapter and the optimizer; returns its step.
    fn load_newest_checkpoint(&mut self) -> Result<u64> {
        let Some((step, dir)) = checkpoint::list(&self.cfg.output).pop() else {
            bail!(
                "--resume: no complete checkpoint in {}",
                self.cfg.output.display()
            );
        };
        let state = TrainerState::read(&dir)?;
        let world = self.rank_and_world().1;
        let mut diffs: Vec<String> = self
            .cfg
            .differences_from(&state.settings)
            .iter()
            .map(|d| format!("{} (saved {}, now {})", d.field, d.saved, d.now))
            .collect();
        // The batches and the data each rank reads depend on the process count.
        if state.world_size != world {
            diffs.push(format!(
                "world_size (saved {}, now {world}: start as many processes, e.g. --nproc {})",
                state.world_size, state.world_size
            ));
        }
        if !diffs.is_empty() {
            bail!(
                "--resume: {} from the run saved in {}: {}; resume with the same settings, or start a new run in another --output",
                if diffs.len() == 1 { "this setting differs" } else { "these settings differ" },
                dir.display(),
                diffs.join(", ")
            );
        }
        if state.total_steps != self.total_steps {
            bail!(
                "--resume: the run saved in {} plans {} steps, these settings and data give {}; \
                 the training data changed",
                dir.display(),
                state.total_steps,
                self.total_steps
            );
        }
        let adapter = peft_adapters::lora::files::read_weights(&dir)?;
        tch::no_grad(|| -> Result<()> {
            for (k, p) in &self.params {
                let t = adapter
                    .get(k)
                    .with_context(|| format!("{}: checkpoint lacks {k}", dir.display()))?;
                p.shallow_clone().copy_(t);
            }
            Ok(())
        })?;
        let optim = Tensor::read_safetensors(dir.join(checkpoint::OPTIMIZER_FILE))
            .with_context(|| format!("{}: cannot read optimizer state", dir.display()))?;
        self.optim.load_state(optim.into_iter().collect())?;
        self.skipped_steps = state.skipped_steps;
        if self.scaler.is_some() {
            self.scaler = state.loss_scaler;
        }
        Ok(step)
    }

    /// Runs the whole training loop with a progress bar, metrics, evaluation
    /// and checkpoints, and saves the final adapter.
    ///
    /// When [`crate::signals::install`] was called, a first SIGINT/SIGTERM/SIGHUP
    /// ends the run after the current step with a checkpoint, returning
    /// [`crate::signals::Interrupted`].
    pub fn run(&mut self) -> Result<Summary> {
        let output = self.cfg.output.clone();
        let metrics_path = output.join("metrics.jsonl");
        let writer = self.is_writer();
        let start_step = if self.cfg.resume {
            let s = self.resume()?;
            if writer {
                keep_metrics_until(&metrics_path, s)?;
                eprintln!(
                    "resuming from {} at step {s}",
                    output.join(format!("checkpoint-{s}")).display()
                );
            }
            s
        } else {
            // Only rank 0's output matters: the other ranks never write.
            let fresh = if writer
                && (!checkpoint::list(&output).is_empty()
                    || output.join("adapter_model.safetensors").exists())
            {
                Err(anyhow::anyhow!(
                    "{}: already holds a run; pass --resume to continue it or choose another --output",
                    output.display()
                ))
            } else {
                Ok(())
            };
            agree::fail_together(self.group.as_ref(), "to start a run in its --output", fresh)?;
            if writer {
                let _ = std::fs::remove_file(&metrics_path);
            }
            0
        };
        // The settings and the adapter's configuration are written first; the
        // adapter weights last, in one rename: a directory holding both files
        // is a finished adapter, whenever the process is killed.
        if self.is_writer() {
            // The settings, and how the run was made (recorded, never read back).
            let mut args = serde_json::to_value(&self.cfg)?;
            args["world_size"] = json!(self.rank_and_world().1);
            peft_adapters::fsio::write_atomic(
                &output.join("training_args.json"),
                serde_json::to_string_pretty(&args)?.as_bytes(),
            )?;
            peft_adapters::fsio::write_atomic(
                &output.join(peft_adapters::lora::files::CONFIG_FILE),
                serde_json::to_string_pretty(&self.lora.to_json())?.as_bytes(),
            )?;
        }
        if writer {
            eprintln!("{}", peft_model::trainable_parameters_line(&self.model));
            eprintln!(
            "{} training examples ({}; {} truncated to {} tokens, {} dropped), {} steps of {} x {}{}{}",
            self.train.examples.len(),
            self.train.format.name(),
            self.train.truncated,
            self.cfg.max_seq_length,
            self.train.dropped,
            self.total_steps,
            self.cfg.per_device_train_batch_size,
            self.cfg.gradient_accumulation_steps,
            if self.regs.is_empty() { String::new() } else { format!(", regularizers: {}", self.regs.names().join(", ")) },
            if self.scaler.is_some() { ", fp16 with dynamic loss scaling" } else { "" }
        );
        }
        let mut metrics = MetricsLog::open(&metrics_path, self.is_writer())?;
        // A signal that arrived while loading stops every rank before the first step.
        if let Some(sig) = agree::agree(self.group.as_ref(), true, signals::pending())?.stop {
            self.stop_on(sig, start_step, false)?;
        }
        let eval_before = if start_step == 0 {
            self.evaluate()?
        } else {
            None
        };
        if let Some(l) = eval_before {
            metrics.write(&json!({"step": 0, "eval_loss": l}))?;
        }
        // Only rank 0 shows progress; every rank prints its errors.
        let bar = if writer {
            ProgressBar::new(self.total_steps)
        } else {
            ProgressBar::hidden()
        }
        .with_position(start_step);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut plain = PlainProgress::new(self.total_steps - start_step);
        plain.on &= writer;
        let t0 = Instant::now();
        let (mut tokens, mut last_loss) = (0i64, f64::NAN);
        let mut eval_after = None;
        for step in start_step..self.total_steps {
            let s = self.train_step(step)?;
            tokens += s.tokens;
            last_loss = s.loss;
            let done = step + 1;
            let tps = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                s.loss, s.lr, tps
            ));
            bar.inc(1);
            plain.step(done, self.total_steps, start_step, &s, tps);
            let mut line = json!({
                "step": done, "epoch": self.plan.epoch_after(done), "loss": s.loss, "lr": s.lr,
                "grad_norm": s.grad_norm, "tokens_per_second": tps,
            });
            if let Some(sc) = &self.scaler {
                line["loss_scale"] = json!(sc.scale());
                line["skipped"] = json!(s.skipped);
            }
            let eval_now = self.cfg.eval_steps > 0 && done % self.cfg.eval_steps == 0
                || done == self.total_steps;
            if eval_now {
                if let Some(l) = self.evaluate()? {
                    line["eval_loss"] = json!(l);
                    eval_after = Some(l);
                    bar.println(format!("step {done}: eval loss {l:.4}"));
                }
            }
            if done % self.cfg.logging_steps == 0 || eval_now {
                metrics.write(&line)?;
            }
            if self.cfg.save_steps > 0 && done % self.cfg.save_steps == 0 && done < self.total_steps
            {
                self.save_checkpoint(done)?;
            }
            if let (Some(sig), true) = (s.stop, done < self.total_steps) {
                self.stop_on(sig, done, true)
                    .inspect_err(|_| bar.abandon())?;
            }
        }
        bar.finish_and_clear();
        self.check_finite()?;
        if self.is_writer() {
            let tensors = peft_model::adapter_tensors(&self.model, DEFAULT_ADAPTER);
            peft_adapters::lora::files::write_safetensors(
                &output.join(peft_adapters::lora::files::WEIGHTS_FILE),
                &tensors,
            )?;
        }
        // Every rank leaves together, after the adapter is written.
        if let Some(g) = &self.group {
            g.barrier()?;
        }
        let seconds = t0.elapsed().as_secs_f64();
        let (frozen_weight_bytes, qbytes, qparams) = self.model.frozen_bytes();
        Ok(Summary {
            steps: self.total_steps,
            skipped_steps: self.skipped_steps,
            final_train_loss: last_loss,
            eval_loss_before: eval_before,
            eval_loss_after: eval_after,
            seconds,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            output,
            frozen_weight_bytes,
            quantized_bytes_per_param: (qparams > 0).then(|| qbytes as f64 / qparams as f64),
        })
    }
}

/// How [`forward_backward`] runs.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    /// Recompute each decoder layer in the backward pass.
    pub gradient_checkpointing: bool,
    /// Rows of logits per cross-entropy chunk.
    pub loss_chunk_size: i64,
}

/// What rank 0 tells the other ranks when it resumes (the tensors travel
/// by all-reduce).
#[derive(serde::Serialize, serde::Deserialize)]
struct Resumed {
    step: u64,
    optimizer_step: u64,
    skipped_steps: u64,
    loss_scaler: Option<LossScaler>,
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

/// The regularizers as the decoder's hooks: called at the embedding and
/// layer outputs with the micro-batch's context, and giving each layer its
/// dropout seed in training.
struct RegularizerHooks<'a> {
    regs: &'a mut RegularizerStack,
    ctx: HookContext<'a>,
}

impl ForwardHooks for RegularizerHooks<'_> {
    fn embedding_output(&mut self, x: Tensor) -> Tensor {
        self.apply(HookPoint::EmbeddingOutput, x)
    }

    fn layer_output(&mut self, i: usize, x: Tensor) -> Tensor {
        self.apply(HookPoint::DecoderLayerOutput(i), x)
    }

    fn layer_seed(&self, i: usize) -> Option<u64> {
        self.ctx
            .training
            .then(|| mix(self.ctx.seed, 10_000 + i as u64))
    }
}

impl RegularizerHooks<'_> {
    fn apply(&mut self, point: HookPoint, x: Tensor) -> Tensor {
        if self.regs.wants(point, self.ctx.training) {
            self.regs.apply(point, x, &self.ctx)
        } else {
            x
        }
    }
}

/// Forward and backward of one micro-batch, accumulating into the adapters'
/// `.grad` (times `mb.loss_scale`); returns its share of the step loss
/// (cross-entropy summed over its label tokens, divided by `mb.denom`).
pub fn forward_backward(
    model: &LlamaForCausalLM,
    regs: &mut RegularizerStack,
    trainable: &[(String, Tensor)],
    batch: &Batch,
    mb: &MicroBatch,
    opts: StepOptions,
) -> Result<f64> {
    let device = model.device();
    let ids = batch.input_ids.to_device(device);
    let labels = batch.labels.to_device(device);
    let mask = batch.attention_mask.to_device(device);
    let segments = batch.segment_ids.as_ref().map(|s| s.to_device(device));
    let mut hooks = RegularizerHooks {
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
    let out = model.decode(&input, None, &mut hooks, opts.gradient_checkpointing);
    let ce_sum = chunked_cross_entropy(
        model,
        &out.hidden,
        &labels,
        opts.loss_chunk_size,
        Some(mb.denom / mb.loss_scale),
    )?;
    // With checkpointing, the gradient stopped at the last layer's output:
    // rebuild each layer and backpropagate through it.
    if let Some(r) = out.recompute {
        r.backward(model, &mut hooks);
    }
    Ok(ce_sum / mb.denom)
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
    let (_, t, h) = hidden.size3()?;
    // Position i predicts token i+1.
    let hs = hidden.narrow(1, 0, t - 1).reshape([-1, h]);
    let ys = labels.narrow(1, 1, t - 1).reshape([-1]);
    let idx = ys.ne(-100).nonzero().squeeze_dim(1);
    let n = idx.size()[0];
    if n == 0 {
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
                    w,
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
        (sel * grad).sum(Kind::Float).backward();
    }
    Ok(total.double_value(&[]))
}

/// Summed cross-entropy of fp32 `logits` `[rows, vocab]` against `targets`.
fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(targets, None, Reduction::Sum, -100, 0.0)
}

/// The summed cross-entropy of `x Wᵀ + b` against `targets`, and the
/// gradient of that sum divided by `scale` with respect to `x`:
/// `(softmax − onehot) W / scale`, in the weight's dtype.
fn cross_entropy_and_input_grad(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    scale: f64,
) -> (Tensor, Tensor) {
    let mut logp = x
        .linear(w, bias)
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float);
    let t = targets.unsqueeze(1);
    let loss = -logp.gather(1, &t, false).sum(Kind::Float);
    let minus_one = Tensor::full([t.size()[0], 1], -1.0, (Kind::Float, x.device()));
    let mut softmax = logp.exp_();
    let mut d = softmax.scatter_add_(1, &t, &minus_one);
    let g = if w.kind() == Kind::Float {
        d.mm(w) / scale
    } else {
        // Scaled before the cast, as autograd would: an fp16 loss scale
        // exists so that small probabilities survive the cast.
        d *= 1.0 / scale;
        d.to_kind(w.kind()).mm(w)
    };
    (loss, g)
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
    let (mut sum, mut count) = (0.0, 0i64);
    for chunk_idx in mine.chunks(batch_size) {
        let ex: Vec<&data::Example> = chunk_idx.iter().map(|&i| &ds.examples[i]).collect();
        let b = data::collate(&ex, pad_id);
        let mask = b.attention_mask.to_device(device);
        let ids = b.input_ids.to_device(device);
        let mut hooks = RegularizerHooks {
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
        sum += chunked_cross_entropy(model, &hidden, &b.labels.to_device(device), chunk, None)?;
        count += b.num_label_tokens;
    }
    Ok((sum, count))
}

/// Progress as plain lines when stderr is not a terminal (nohup, CI, a
/// scheduler), where the bar is hidden: every twentieth of the run and at
/// least once a minute, as transformers' Trainer logs.
struct PlainProgress {
    on: bool,
    every: u64,
    last: Instant,
    started: Instant,
}

impl PlainProgress {
    fn new(steps: u64) -> Self {
        Self {
            on: !std::io::IsTerminal::is_terminal(&std::io::stderr()),
            every: (steps / 20).max(1),
            last: Instant::now(),
            started: Instant::now(),
        }
    }

    fn step(&mut self, done: u64, total: u64, start: u64, s: &StepStats, tps: f64) {
        let due =
            done.is_multiple_of(self.every) || self.last.elapsed().as_secs() >= 60 || done == total;
        if !self.on || !due {
            return;
        }
        self.last = Instant::now();
        let per_step = self.started.elapsed().as_secs_f64() / (done - start).max(1) as f64;
        let eta = (per_step * (total - done) as f64) as u64;
        eprintln!(
            "step {done}/{total}  loss {:.4}  lr {:.2e}  grad norm {:.3}  {:.0} tok/s  eta {}:{:02}:{:02}",
            s.loss,
            s.lr,
            s.grad_norm,
            tps,
            eta / 3600,
            eta / 60 % 60,
            eta % 60
        );
    }
}

/// `metrics.jsonl`, appended line by line and flushed, with errors naming the file.
struct MetricsLog {
    /// `None` on ranks other than 0, which write nothing.
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl MetricsLog {
    fn open(path: &Path, writer: bool) -> Result<Self> {
        let file = writer
            .then(|| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("{}: cannot open for writing", path.display()))
            })
            .transpose()?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        writeln!(file, "{line}")
            .and_then(|()| file.flush())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

fn keep_metrics_until(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    peft_adapters::lora::files::write_atomic(path, out.as_bytes())
}

/// What every rank of a run must share: its settings but those that may
/// differ between ranks (its own device, where it writes and logs), with the
/// content of the model and the data in place of their paths (node-local
/// copies may sit in other folders).
fn settings_to_agree_on(
    cfg: &TrainConfig,
    model_dir: &Path,
    train: &Dataset,
    eval: Option<&Dataset>,
) -> Result<BTreeMap<String, String>> {
    const PER_RANK: [&str; 9] = [
        "output",
        "device",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "nproc",
        "model",
        "data",
        "eval_data",
    ];
    let mut settings: BTreeMap<String, String> = match serde_json::to_value(cfg)? {
        serde_json::Value::Object(m) => m
            .into_iter()
            .filter(|(k, _)| !PER_RANK.contains(&k.as_str()))
            .map(|(k, v)| (k, v.to_string()))
            .collect(),
        _ => unreachable!("TrainConfig serialises to an object"),
    };
    let mut model = Vec::new();
    for file in ["config.json", "tokenizer.json"] {
        let path = model_dir.join(file);
        model.extend(
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
        );
    }
    let digest = |ds: &Dataset| {
        format!(
            "{} examples, digest {:016x}",
            ds.examples.len(),
            ds.digest()
        )
    };
    settings.insert(
        "model (config.json, tokenizer.json)".into(),
        format!("{} bytes, digest {:016x}", model.len(), fnv1a(&model)),
    );
    settings.insert("data (tokenized)".into(), digest(train));
    if let Some(e) = eval {
        settings.insert("evaluation data (tokenized)".into(), digest(e));
    }
    Ok(settings)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Joins the c10d process group torchrun's variables (or `--nproc`'s
/// launcher) describe, on this rank's device.
fn join_process_group(
    cfg: &TrainConfig,
    env: &crate::dist::DistEnv,
    device: tch::Device,
) -> Result<crate::dist::ProcessGroup> {
    use crate::dist::ProcessGroup;
    let backend = cfg.dist_backend.resolve(device)?;
    let cuda_index = match device {
        tch::Device::Cuda(i) => Some(i),
        _ => None,
    };
    let group = ProcessGroup::join(
        env,
        backend,
        std::time::Duration::from_secs(cfg.dist_timeout),
        cuda_index,
    )?;
    if env.rank == 0 {
        eprintln!(
            "data-parallel over {} processes ({backend}, rendezvous at {}:{})",
            env.world_size, env.master_addr, env.master_port
        );
    }
    Ok(group)
}
