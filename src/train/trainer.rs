//! The trainer: its state, and setting a run up — placement and the
//! process group, the output folder, model, data, adapters, regularizers and
//! optimizer — and what every rank checks with the others before training.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::optim::{self, AdamW};
use super::{EpochPlan, LossScaler, TrainConfig};
use crate::data::{self, Batch, DataOptions, Dataset};
use crate::device::resolve_model_dir;
use crate::dist::agree;
use crate::models::{LlamaForCausalLM, ModelFiles};
use crate::outputs;
use crate::peft_model::{self, DEFAULT_ADAPTER};
use peft_adapters::method::AdapterConfig;
use peft_regularizers::rng::with_torch_seed;
use peft_regularizers::{Registry, RegularizerStack};

/// A training run in progress.
pub struct Trainer {
    /// The settings (`model` resolved to the directory actually loaded).
    pub cfg: TrainConfig,
    /// The base with adapters attached.
    pub model: LlamaForCausalLM,
    /// The adapter's configuration (before a PiSSA/OLoRA adapter's
    /// conversion for saving).
    pub adapter: AdapterConfig,
    pub(crate) regs: RegularizerStack,
    pub(crate) params: BTreeMap<String, Tensor>,
    pub(crate) trainable: Vec<(String, Tensor)>,
    pub(crate) optim: AdamW,
    /// Which rank keeps each adapter tensor's optimizer state, when it is
    /// sharded (`--shard-optimizer-state`, on with `--fsdp`).
    pub(crate) optim_shards: Option<crate::dist::zero::OptimizerShards>,
    /// The gradients sharded with it, layer by layer (with `--fsdp` and
    /// gradient checkpointing).
    pub(crate) grad_shards: Option<Rc<crate::dist::zero::GradShards>>,
    pub(crate) scaler: Option<LossScaler>,
    pub(crate) skipped_steps: u64,
    pub(crate) train: Dataset,
    pub(crate) eval: Option<Dataset>,
    pub(crate) pad_id: i64,
    order_cache: Option<(u64, Vec<Vec<usize>>)>,
    /// How optimizer steps map to epochs and micro-batches.
    pub plan: EpochPlan,
    /// Optimizer steps per run.
    pub total_steps: u64,
    pub(crate) warmup: u64,
    /// Held by the one process that writes (rank 0, or the only process).
    pub(crate) lock: Option<outputs::OutputLock>,
    /// The c10d process group of a multi-process run.
    pub(crate) group: Option<std::sync::Arc<crate::dist::ProcessGroup>>,
    /// Time spent in the gradient all-reduce, after every rank arrived.
    pub all_reduce_seconds: f64,
    /// Time spent waiting for the slowest rank before it.
    pub wait_seconds: f64,
    /// The weight of the router's load-balancing loss, when it is added.
    pub router_aux_loss_coef: Option<f64>,
    /// This process's resident memory before the base was loaded (libtorch,
    /// the process group, the tokenizer and the tokenized data): what the
    /// run's own memory is counted above.
    pub rss_before_load: u64,
}

impl Trainer {
    /// Loads the base, the data and fresh adapters, and makes the
    /// regularizers the settings name (NEFTune's short form first) with
    /// `registry`.
    pub fn new(mut cfg: TrainConfig, registry: &Registry) -> Result<Self> {
        cfg.validate()?;
        // Named regularizers are made first: a typo fails before anything loads.
        let mut regs = RegularizerStack::new();
        for spec in cfg.regularizer_specs()? {
            regs.push(registry.build(&spec)?);
        }
        if cfg.tf32 {
            crate::device::allow_tf32();
        }
        let (place, group, lock) = claim_and_join(&mut cfg)?;
        let group = group.map(std::sync::Arc::new);
        let (device, kind) = (place.device, place.kind);
        let model_dir = cfg.model.clone().expect("resolved by claim_and_join");
        let quantize = cfg.quantization(kind, device);
        let router_aux_loss_coef = router_aux_loss_coef(&cfg, &model_dir)?;
        let shard = group
            .as_ref()
            .filter(|_| cfg.fsdp)
            .map(|g| (g.rank(), g.world_size()));
        if shard.is_some() {
            check_fsdp_settings(&cfg, &model_dir)?;
        } else if cfg.fsdp {
            eprintln!("note: --fsdp with one process: nothing to shard, the whole base is loaded (start several with --nproc N or torchrun)");
        }
        // The data first: a bad record is reported before the weights load,
        // and what the tokenizer and the data hold is not the model's memory.
        let files = ModelFiles::read(&model_dir)?;
        let (train, eval, pad_id) = load_data(&cfg, &files)?;
        // The tokenizer is not needed past the data.
        let ModelFiles { dir, config, .. } = files;
        let before_load = crate::memory::MemoryUsage::now();
        let mut model =
            crate::models::load_with_config(&dir, config, kind, device, quantize.as_ref(), shard)?;
        if let (Some(g), Some(_)) = (&group, shard) {
            model.start_fsdp(g.clone())?;
            if let Some(f) = model.fsdp_mut() {
                f.set_prefetch(cfg.fsdp_prefetch);
            }
        }
        // `all-linear` resolved as PEFT resolves it on this model (a mixture
        // of experts: the router and experts too), and saved that way.
        let adapter = match cfg.adapter_config(&model_dir) {
            peft_adapters::method::AdapterConfig::Lora(c) => {
                peft_model::for_model(&c, &model.config).into()
            }
            other => other,
        };
        with_torch_seed(cfg.seed, || {
            peft_model::inject_adapter(&mut model, DEFAULT_ADAPTER, &adapter)
        })?;
        peft_model::set_training(&mut model, true);
        let base_output = match quantize.as_ref().map(|q| &q.mode) {
            Some(crate::quant::config::BnbMode::FourBit { compute_dtype, .. }) => *compute_dtype,
            _ => kind,
        };
        let lora_kind = cfg.lora_compute_kind(base_output, device);
        // Recorded as used, not "auto", as the base's dtype is.
        cfg.lora_compute_dtype = crate::device::DtypeArg::naming(lora_kind);
        peft_model::set_compute_kind(&mut model, lora_kind);
        peft_model::set_dropout_sharing(&mut model, cfg.share_lora_dropout);
        let params = peft_model::trainable_parameters(&model);
        let trainable = params
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        let optim_shards = group
            .as_ref()
            .filter(|_| cfg.shards_optimizer_state())
            .map(|g| {
                let numels = params
                    .iter()
                    .map(|(k, t)| (k.clone(), t.numel() as i64))
                    .collect();
                crate::dist::zero::OptimizerShards::new(&numels, g.rank(), g.world_size())
            });
        let grad_shards = optim_shards
            .as_ref()
            .filter(|_| cfg.checkpointing() && model.fsdp().is_some())
            .map(|z| {
                let layers = model.model.layers.len();
                Rc::new(crate::dist::zero::GradShards::new(z, &params, layers))
            });
        if let (Some(gs), Some(f)) = (&grad_shards, model.fsdp_mut()) {
            f.set_after_layer_backward(gs.clone());
        }
        // Moments for the tensors this rank updates (all of them unless sharded).
        let updated: BTreeMap<String, Tensor> = params
            .iter()
            .filter(|(k, _)| optim_shards.as_ref().is_none_or(|z| z.owns(k)))
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        let mut optim = AdamW::new(
            &updated,
            (cfg.adam_beta1, cfg.adam_beta2),
            cfg.adam_epsilon,
            cfg.weight_decay,
        );
        if let Some(ratio) = cfg.loraplus_lr_ratio {
            optim.lr_scale = super::optim::loraplus_lr_scales(&params, ratio);
            optim.weight_decay = cfg.loraplus_weight_decay;
        }
        let world_size = group.as_ref().map_or(1, |g| g.world_size());
        let (plan, total_steps, warmup) = schedule(&cfg, train.examples.len(), world_size);
        // fp16 gradients underflow without loss scaling (torch's GradScaler);
        // bf16 has fp32's range and needs none.
        let scaler = (kind == Kind::Half).then(LossScaler::default);
        // Before the first collective whose size depends on the settings.
        if let Some(g) = &group {
            let settings = settings_to_agree_on(&cfg, &model_dir, &train, eval.as_ref())?;
            agree::agree_on_settings(g, &settings)?;
        }
        Ok(Self {
            lock,
            group,
            all_reduce_seconds: 0.0,
            wait_seconds: 0.0,
            router_aux_loss_coef,
            rss_before_load: before_load.anon + before_load.file,
            cfg,
            model,
            adapter,
            regs,
            params,
            trainable,
            optim,
            optim_shards,
            grad_shards,
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
    pub(crate) fn batches_for_step(&mut self, step: u64) -> (Vec<(Batch, Vec<usize>)>, i64, i64) {
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
    pub(crate) fn is_writer(&self) -> bool {
        self.lock.is_some()
    }

    /// This process's rank and the number of processes (0 and 1 alone).
    pub fn rank_and_world(&self) -> (usize, usize) {
        self.group
            .as_ref()
            .map_or((0, 1), |g| (g.rank(), g.world_size()))
    }

    pub(crate) fn zero_grads(&mut self) {
        optim::clear_grads(self.params.values());
        // Sharded gradients are freed, not zeroed: each step's are new.
        if let Some(gs) = &self.grad_shards {
            gs.clear();
        }
    }

    /// Refuses to write adapter weights that are not finite.
    pub(crate) fn check_finite(&self) -> Result<()> {
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
        peft_model::save_adapter_of(&self.model, DEFAULT_ADAPTER, &self.adapter, dir)
    }
}

/// Where this process trains and with whom: its device (cuda:LOCAL_RANK
/// for one of several processes, so the process group is read before the
/// device is chosen), the process group joined, and rank 0's lock on the
/// output folder, claimed before anything slow. Records in `cfg` the model
/// directory and the device and dtype used, not "auto".
fn claim_and_join(
    cfg: &mut TrainConfig,
) -> Result<(
    crate::device::Placement,
    Option<crate::dist::ProcessGroup>,
    Option<outputs::OutputLock>,
)> {
    let dist = crate::dist::DistEnv::from_env()?;
    if let Some(d) = &dist {
        d.check_master()?;
    }
    let place = crate::device::Placement::resolve_for(
        cfg.device,
        cfg.dtype,
        dist.as_ref().map(crate::dist::DistEnv::local),
    )?;
    let asked = cfg.dtype;
    cfg.gradient_checkpointing = Some(cfg.checkpointing());
    // With several processes each takes its own GPU, which `cuda` records.
    (cfg.device, cfg.dtype) = place.recorded(dist.is_some());
    let writer = dist.as_ref().is_none_or(|d| d.rank == 0);
    if writer {
        eprintln!("training on {}", place.describe_choice(asked));
    }
    let model_dir = resolve_model_dir(cfg.model.clone())?;
    cfg.model = Some(model_dir.clone());
    let Some(data_path) = cfg.data.clone() else {
        bail!("no training data: pass --data FILE (Alpaca JSON, or JSONL with messages, prompt/completion or text)");
    };
    let mut inputs = vec![
        ("base model", model_dir.as_path()),
        ("training data", data_path.as_path()),
    ];
    if let Some(e) = &cfg.eval_data {
        inputs.push(("evaluation data", e.as_path()));
    }
    outputs::refuse_overlap("--output", &cfg.output, &inputs)?;
    let group = match &dist {
        Some(env) => Some(join_process_group(cfg, env, place.device)?),
        None => None,
    };
    // One writer: rank 0 owns the output; the other ranks only read it.
    let lock = match writer {
        false => None,
        true => Some(outputs::claim_dir("--output", &cfg.output, "train")?),
    };
    Ok((place, group, lock))
}

/// The training data (packed when asked), the evaluation data (a file, or
/// records held out of the training data), and the padding token.
fn load_data(cfg: &TrainConfig, base: &ModelFiles) -> Result<(Dataset, Option<Dataset>, i64)> {
    let eos = base.completion_eos()?;
    let opts = DataOptions {
        format: cfg.format,
        max_seq_len: cfg.max_seq_length,
        train_on_prompt: cfg.train_on_prompt,
    };
    let data_path = cfg.data.as_deref().expect("checked by claim_and_join");
    let mut train = data::load_dataset(data_path, &base.tokenizer, eos, &opts)?;
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
    Ok((train, eval, pad_id))
}

/// How `examples` training examples map to optimizer steps (a batch is
/// `--batch-size` rows on each of `world_size` ranks), the run's steps, and
/// its warmup steps.
fn schedule(cfg: &TrainConfig, examples: usize, world_size: usize) -> (EpochPlan, u64, u64) {
    let plan = EpochPlan {
        batches_per_epoch: examples.div_ceil(cfg.per_device_train_batch_size * world_size) as u64,
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
    (plan, total_steps, warmup)
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
    const PER_RANK: [&str; 10] = [
        "output",
        "device",
        "logging_steps",
        "report_to",
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

/// Refuses what `--fsdp` cannot do yet, by name, before anything loads:
/// adapter methods other than LoRA, and LoRA settings that read the whole
/// base weight when the adapter is made (DoRA, PiSSA/OLoRA/LoftQ-style inits).
fn check_fsdp_settings(cfg: &TrainConfig, model_dir: &std::path::Path) -> Result<()> {
    match cfg.adapter_config(model_dir) {
        peft_adapters::method::AdapterConfig::Lora(c) => {
            if c.use_dora {
                bail!("--fsdp with use_dora: DoRA reads each whole base weight when it is made; train DoRA without --fsdp");
            }
            if c.init_lora_weights.mutates_base() {
                bail!(
                    "--fsdp with init_lora_weights = {}: that initialisation reads and changes each whole base weight; use the default init with --fsdp",
                    c.init_lora_weights
                );
            }
            Ok(())
        }
        other => bail!(
            "--fsdp supports LoRA adapters; {} is not supported with it yet (train it without --fsdp)",
            other.to_json()["peft_type"].as_str().unwrap_or("this adapter method")
        ),
    }
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

/// The weight of the router's load-balancing loss, when training adds it:
/// as transformers, when a mixture of experts' `output_router_logits` is
/// true (config.json's, or the flag's), times `router_aux_loss_coef`.
/// Either flag on a dense model, or a coefficient with the loss off, is
/// refused by name rather than ignored.
fn router_aux_loss_coef(cfg: &TrainConfig, model_dir: &Path) -> Result<Option<f64>> {
    let config = crate::models::read_config(model_dir)?;
    let Some(moe) = config.moe else {
        if cfg.output_router_logits.is_some() || cfg.router_aux_loss_coef.is_some() {
            bail!(
                "--output-router-logits / --router-aux-loss-coef: {} is not a mixture of experts \
                 (no router to balance); leave them out",
                model_dir.display()
            );
        }
        return Ok(None);
    };
    let on = cfg.output_router_logits.unwrap_or(moe.output_router_logits);
    let coef = cfg.router_aux_loss_coef.unwrap_or(moe.router_aux_loss_coef);
    if !coef.is_finite() || coef < 0.0 {
        bail!("--router-aux-loss-coef {coef}: expected a finite number >= 0");
    }
    match (on, cfg.router_aux_loss_coef) {
        (true, _) => Ok(Some(coef)),
        (false, Some(c)) => bail!(
            "--router-aux-loss-coef {c} is set but the load-balancing loss is off \
             (`output_router_logits` is false in {}); add --output-router-logits",
            model_dir.join("config.json").display()
        ),
        (false, None) => Ok(None),
    }
}
