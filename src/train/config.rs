//! Every training setting in one typed struct, [`TrainConfig`]. It is the
//! single source of the `peft-rs train` flags (clap derives them from it),
//! of `--config` files (TOML or YAML with the same field names) and of
//! `training_args.json`. Defaults live in one place, [`Default`]; a config
//! file is read over the defaults and then only the flags actually given on
//! the command line override it.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::ArgAction;
use serde::{Deserialize, Serialize};

use super::settings_file::one_line;
use crate::data::DataFormat;
use crate::device::{DeviceArg, DtypeArg};
use crate::models::{Checkpointing, KeptProducts};
use crate::quant::{BnbQuantization, Quantize};
use peft_adapters::ia3::Ia3Config;
use peft_adapters::loha::LohaConfig;
use peft_adapters::lokr::{InitWeights, LokrConfig};
use peft_adapters::lora::{InitLoraWeights, LoraConfig, TargetModules};
use peft_adapters::lycoris::LycorisConfig;
use peft_adapters::method::AdapterConfig;
use peft_adapters::vera::VeraConfig;
use peft_regularizers::{NeftuneMode, NoiseDistribution, RegularizerSpec};

/// Learning-rate schedules, with transformers' `SchedulerType` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Schedule {
    /// Constant, without warmup (transformers' `constant` ignores warmup).
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
    /// Linear warmup, then linear decay to 0.
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
}

impl Schedule {
    /// Whether the schedule has a warmup phase.
    pub fn has_warmup(self) -> bool {
        self != Schedule::Constant
    }
}

/// Where metrics are reported besides `metrics.jsonl` (transformers' `report_to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ReportTo {
    /// Only `metrics.jsonl`.
    None,
    /// Also TensorBoard event files under `OUTPUT/runs/`.
    Tensorboard,
}

/// Settings a resumed run may change: they affect where things are written,
/// what is logged, or how fast, but not the loss curve or the adapter.
pub const RESUMABLE_CHANGES: &[&str] = &[
    "output",
    "resume",
    "device",
    "eval_steps",
    "logging_steps",
    "report_to",
    "save_steps",
    "save_total_limit",
    "gradient_checkpointing",
    "gradient_checkpointing_keep_mlp",
    "gradient_checkpointing_keep_attention",
    "loss_chunk_size",
    "nproc",
    "dist_backend",
    "dist_timeout",
    "fsdp",
    "fsdp_prefetch",
    "shard_optimizer_state",
];

/// Fields that `training_args.json` records about how a run was made, which
/// no settings file sets (a run's `training_args.json` fed back as
/// `--config` repeats the run with the process count of the command line).
pub const RECORDED_FIELDS: &[&str] = &["world_size"];

/// Rows of logits per cross-entropy chunk unless asked otherwise: in
/// training, one chunk-sized tensor in the head's dtype at the peak
/// (256 × 49152 × 2 bytes = 25 MB for SmolLM2 in bf16, 66 MB for Llama 3's
/// vocabulary), with matmuls still large enough to run at full speed.
pub const LOSS_CHUNK_SIZE: i64 = 256;

fn defaults() -> TrainConfig {
    TrainConfig::default()
}

/// A complete training run's settings. Field names follow PEFT/TRL/transformers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct TrainConfig {
    /// Base model directory, or Hub id ORG/NAME[@REVISION] from the Hugging Face cache
    /// (default: the SmolLM2-135M-Instruct that ./scripts/setup.sh converts).
    #[arg(long, value_name = "DIR|ID")]
    pub model: Option<PathBuf>,
    /// Training data: Alpaca JSON/JSONL, or JSONL with messages, prompt/completion or text.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Data format (default: detected from the first record).
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    /// Output directory: adapter, checkpoint-N/, metrics.jsonl, training_args.json.
    #[arg(long, value_name = "DIR", default_value_os_t = defaults().output)]
    pub output: PathBuf,
    /// Evaluation data file (evaluated with noise and dropout off).
    #[arg(long, value_name = "FILE")]
    pub eval_data: Option<PathBuf>,
    /// Hold out this many training examples for evaluation (when no --eval-data).
    #[arg(long, value_name = "N", default_value_t = defaults().eval_holdout)]
    pub eval_holdout: usize,
    /// Evaluate every N steps (0: only before the first step and at the end).
    #[arg(long, value_name = "N", default_value_t = defaults().eval_steps)]
    pub eval_steps: u64,

    /// The adapter method: lora (with rsLoRA, DoRA, PiSSA/OLoRA), ia3, loha,
    /// lokr or vera (PEFT's `peft_type`). IA³ reads `target_modules` and
    /// `exclude_modules` below, and `feedforward_modules`,
    /// `init_ia3_weights`; LoHa and LoKr read `lora_rank` and `lora_alpha`
    /// as their `r` and `alpha`, the targeting and pattern fields,
    /// `rank_dropout`, `module_dropout` and `init_weights`; LoKr also
    /// `decompose_both`, `decompose_factor` and `rank_dropout_scale`; VeRA
    /// reads `lora_rank` as its `r`, the targeting fields, `init_weights`
    /// and `projection_prng_key`, `save_projection`, `vera_dropout`,
    /// `d_initial`.
    #[arg(long, value_enum, default_value_t = defaults().peft_type)]
    pub peft_type: PeftType,
    /// IA³: the targeted modules whose input is rescaled (PEFT's
    /// `feedforward_modules`: names a path ends with); the others rescale their output.
    #[arg(long, value_name = "NAMES", default_value_t = defaults().feedforward_modules)]
    pub feedforward_modules: TargetModules,
    /// IA³: start every vector at one (the model is unchanged), or N(0, 1) with false.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().init_ia3_weights)]
    pub init_ia3_weights: bool,
    /// LoHa, LoKr: in training, the probability of dropping each row of ΔW.
    #[arg(long, value_name = "P", default_value_t = defaults().rank_dropout)]
    pub rank_dropout: f64,
    /// LoHa, LoKr: in training, the probability of skipping the adapter in a forward pass.
    #[arg(long, value_name = "P", default_value_t = defaults().module_dropout)]
    pub module_dropout: f64,
    /// LoHa, LoKr, VeRA: start with ΔW = 0 (true), every factor random
    /// (false), or for LoKr as LyCORIS does (lycoris: W2 zero instead of W1).
    #[arg(long, num_args = 0..=1, default_missing_value = "true",
          value_name = "true|false|lycoris", default_value_t = defaults().init_weights)]
    pub init_weights: InitWeights,
    /// LoKr: write the left Kronecker factor as a low-rank product too.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().decompose_both)]
    pub decompose_both: bool,
    /// LoKr: the left factor's size along each dimension where it divides
    /// the dimension (-1: near the square root).
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          default_value_t = defaults().decompose_factor)]
    pub decompose_factor: i64,
    /// LoKr: rescale the rows rank dropout keeps by the share kept.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().rank_dropout_scale)]
    pub rank_dropout_scale: bool,
    /// LoRA with `init_lora_weights` loftq: alternations of quantizing and
    /// the SVD (PEFT's `loftq_config.loftq_iter`).
    #[arg(long, value_name = "N", default_value_t = defaults().loftq_iter)]
    pub loftq_iter: u32,
    /// VeRA: the seed of the random projections all layers share.
    #[arg(long, value_name = "N", default_value_t = defaults().projection_prng_key)]
    pub projection_prng_key: u64,
    /// VeRA: save the shared projections in the adapter (else they are drawn
    /// again from the seed when loading).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().save_projection)]
    pub save_projection: bool,
    /// VeRA: dropout on the adapter's input in training.
    #[arg(long, value_name = "P", default_value_t = defaults().vera_dropout)]
    pub vera_dropout: f64,
    /// VeRA: the starting value of the λ_d vectors.
    #[arg(long, value_name = "X", allow_negative_numbers = true,
          default_value_t = defaults().d_initial)]
    pub d_initial: f64,
    /// The adapter: LoRA's settings (`lora_rank`, `lora_alpha`,
    /// `lora_dropout`, `target_modules`, `use_rslora`, `use_dora`,
    /// `init_lora_weights`, and in settings files the pattern fields),
    /// flattened into these settings under those names.
    #[serde(flatten)]
    #[command(flatten)]
    pub lora: LoraConfig,
    /// One LoRA dropout draw for the layers that read the same input (q/k/v,
    /// gate/up): the same rate and expectation per layer, one mask and one
    /// dropped copy of the input instead of three or two (faster, less
    /// memory). false: one draw per layer, as PEFT.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().share_lora_dropout)]
    pub share_lora_dropout: bool,

    /// NEFTune noise alpha (TRL's neftune_noise_alpha); 0 is off. The paper uses 5, 10, 15.
    #[arg(long = "neftune-alpha", alias = "neftune-noise-alpha", value_name = "ALPHA",
          default_value_t = defaults().neftune_noise_alpha)]
    pub neftune_noise_alpha: f64,
    /// paper: L = each example's real length, no noise on padding; hf: L = padded batch length, as TRL.
    #[arg(long, value_enum, default_value_t = defaults().neftune_mode)]
    pub neftune_mode: NeftuneMode,
    /// uniform (the paper) or gaussian (its ablation).
    #[arg(long, value_enum, default_value_t = defaults().neftune_noise)]
    pub neftune_noise: NoiseDistribution,
    /// A regularizer by name, with its parameters (repeatable; applied in the
    /// order given, after NEFTune): e.g. hidden_noise:layer=3,std=0.01 or
    /// neftune:alpha=5,mode=hf. Built in: neftune (alpha, mode, noise) and
    /// hidden_noise (layer, std); a program built on peft-rs may register more.
    /// In settings files: [[regularizers]] tables with `kind` and the keys.
    #[arg(long = "regularizer", value_name = "NAME[:KEY=VALUE,...]")]
    pub regularizers: Vec<RegularizerSpec>,

    /// Examples per micro-batch.
    #[arg(long = "batch-size", alias = "per-device-train-batch-size", value_name = "N",
          default_value_t = defaults().per_device_train_batch_size)]
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long = "grad-accum", alias = "gradient-accumulation-steps", value_name = "N",
          default_value_t = defaults().gradient_accumulation_steps)]
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    #[arg(long = "lr", alias = "learning-rate", value_name = "LR", default_value_t = defaults().learning_rate)]
    pub learning_rate: f64,
    /// Mixtures of experts: add the router's load-balancing loss to the training
    /// loss, as transformers does when the model's config sets it (default: config.json's).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL")]
    pub output_router_logits: Option<bool>,
    /// The load-balancing loss's weight (default: config.json's, e.g. 0.001 for Qwen3-MoE).
    #[arg(long, value_name = "F")]
    pub router_aux_loss_coef: Option<f64>,
    /// AdamW weight decay (decoupled).
    #[arg(long, default_value_t = defaults().weight_decay)]
    pub weight_decay: f64,
    /// LoRA+ (PEFT's create_loraplus_optimizer): lora_B (and 1-D adapter
    /// tensors such as DoRA's magnitude) learn at R times the learning rate.
    #[arg(long, value_name = "R")]
    pub loraplus_lr_ratio: Option<f64>,
    /// The weight decay of LoRA+'s parameter groups (PEFT's default 0, which
    /// replaces --weight-decay under LoRA+).
    #[arg(long, value_name = "WD", default_value_t = defaults().loraplus_weight_decay)]
    pub loraplus_weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = defaults().adam_beta1)]
    pub adam_beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = defaults().adam_beta2)]
    pub adam_beta2: f64,
    /// AdamW epsilon.
    #[arg(long, default_value_t = defaults().adam_epsilon)]
    pub adam_epsilon: f64,
    /// Learning-rate schedule (transformers' names; `constant` has no warmup).
    #[arg(long = "lr-scheduler", alias = "lr-scheduler-type", value_enum,
          default_value_t = defaults().lr_scheduler_type)]
    pub lr_scheduler_type: Schedule,
    /// Warmup steps (take precedence over --warmup-ratio when > 0).
    #[arg(long, value_name = "N", default_value_t = defaults().warmup_steps)]
    pub warmup_steps: u64,
    /// Warmup as a fraction of all optimizer steps.
    #[arg(long, default_value_t = defaults().warmup_ratio)]
    pub warmup_ratio: f64,
    /// Clip the gradient norm to this (0: off).
    #[arg(long, default_value_t = defaults().max_grad_norm)]
    pub max_grad_norm: f64,
    /// Passes over the data (ignored when --max-steps > 0); may be fractional.
    #[arg(long = "epochs", alias = "num-train-epochs", value_name = "E",
          default_value_t = defaults().num_train_epochs)]
    pub num_train_epochs: f64,
    /// Stop after N optimizer steps (overrides --epochs; 0: use --epochs).
    #[arg(long, value_name = "N", default_value_t = defaults().max_steps)]
    pub max_steps: u64,
    /// Truncate examples to N tokens.
    #[arg(long = "max-seq-len", alias = "max-seq-length", value_name = "N",
          default_value_t = defaults().max_seq_length)]
    pub max_seq_length: usize,
    /// Compute the loss on prompt tokens (and non-assistant turns) too.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().train_on_prompt)]
    pub train_on_prompt: bool,
    /// Pack several examples into each row of --max-seq-len tokens (TRL's packing, best fit
    /// decreasing); each example keeps its own positions and attends only to itself.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().packing)]
    pub packing: bool,
    /// Batch examples of similar length together (less padding); --group-by-length false to turn off.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().group_by_length)]
    pub group_by_length: bool,
    /// Seed of adapter init, data order, dropout and noise. On the CPU one seed
    /// gives a bit-identical run; on CUDA the initial adapter is the same (it is
    /// drawn on the CPU) but attention's backward is not deterministic and
    /// dropout/noise draws differ from the CPU's, so curves agree only statistically.
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,
    /// auto, cpu, cuda or cuda:N; auto uses CUDA when libtorch can.
    #[arg(long, default_value_t = defaults().device)]
    pub device: DeviceArg,
    /// Dtype of the frozen base (adapters and the loss are fp32): auto is bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere.
    #[arg(long, value_enum, default_value_t = defaults().dtype)]
    pub dtype: DtypeArg,
    /// Store the frozen linear layers quantized as bitsandbytes does (QLoRA: nf4); embeddings,
    /// norms and lm_head stay in --dtype, adapters in fp32.
    #[arg(long, value_enum, value_name = "nf4|fp4|int8")]
    pub quantize: Option<Quantize>,
    /// Quantize the 4-bit absmax values again (QLoRA's double quantization; transformers'
    /// default is false).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().bnb_4bit_use_double_quant)]
    pub bnb_4bit_use_double_quant: bool,
    /// Dtype the 4-bit matmuls run in (default: --dtype).
    #[arg(long, value_enum)]
    pub bnb_4bit_compute_dtype: Option<DtypeArg>,
    /// Recompute each decoder layer in the backward pass (less memory, about a third more
    /// compute). Default: on with --quantize (as PEFT's `prepare_model_for_kbit_training`),
    /// off otherwise.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL")]
    pub gradient_checkpointing: Option<bool>,
    /// With gradient checkpointing, keep the frozen products of each layer's MLP gate and
    /// up projections from the forward pass, so that the recompute does not multiply by
    /// those weights again: most of the recompute's work (measured at 512 tokens: a
    /// Llama-3.2-1B-shaped step about a fifth faster, a Llama-3.1-8B-shaped one a third)
    /// for 2 · intermediate_size values a token and layer (bf16: 0.27 GB at 1B and 512
    /// tokens). Same gradients. Dense weights only (not with --quantize or --fsdp).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().gradient_checkpointing_keep_mlp)]
    pub gradient_checkpointing_keep_mlp: bool,
    /// With gradient checkpointing, keep the frozen products of each layer's query, key,
    /// value and output projections from the forward pass, so that the recompute does
    /// not multiply by those weights again. Each kept value saves as much recompute as
    /// one of --gradient-checkpointing-keep-mlp's: a Llama layer's attention products
    /// are about a third as many as its MLP's (2 · hidden + 2 · kv_heads · head_dim
    /// values a token and layer; bf16: 0.34 GB at the Llama-3.1-8B shape and 512
    /// tokens), for about a quarter of a recompute. Same gradients. Combines with
    /// --gradient-checkpointing-keep-mlp (then the recompute multiplies by no frozen
    /// weight: norms, RoPE, attention and adapters are what is left of it). Dense weights
    /// only (not with --quantize or --fsdp).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().gradient_checkpointing_keep_attention)]
    pub gradient_checkpointing_keep_attention: bool,
    /// Dtype of the LoRA matmuls. auto (default): the frozen base's compute dtype,
    /// as transformers' Trainer runs PEFT under autocast with bf16=True or fp16=True:
    /// a bf16 base gets bf16 LoRA matmuls, scaling and sum (adapter parameters,
    /// gradients and optimizer stay fp32), an fp32 base fp32 ones. fp32: PEFT's eager
    /// forward bit for bit (the input cast to the fp32 adapter, the sum in fp32), about
    /// a fifth slower on a bf16 base. DoRA layers always compute in fp32.
    #[arg(long, value_enum, value_name = "DTYPE", default_value_t = defaults().lora_compute_dtype)]
    pub lora_compute_dtype: DtypeArg,
    /// Allow TF32 tensor cores for fp32 matmuls on CUDA (Ampere and newer):
    /// much faster, about 10 bits of mantissa. No effect on the CPU.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().tf32)]
    pub tf32: bool,
    /// Start N local worker processes and train data-parallel across them
    /// (each takes --batch-size rows of every batch; gradients are all-reduced
    /// through c10d). Under torchrun, WORLD_SIZE and RANK are read instead.
    #[arg(long, value_name = "N", default_value_t = defaults().nproc)]
    pub nproc: usize,
    /// c10d backend of multi-process training: auto (Gloo on the CPU, NCCL on CUDA), gloo or nccl.
    #[arg(long, value_enum, default_value_t = defaults().dist_backend)]
    pub dist_backend: crate::dist::Backend,
    /// Seconds a rank waits for the others in a collective before the whole run stops.
    #[arg(long, value_name = "SECONDS", default_value_t = defaults().dist_timeout)]
    pub dist_timeout: u64,
    /// Shard the frozen base over the ranks, as PyTorch's FSDP does: each rank holds
    /// 1/N of every frozen weight (4-bit ones as packed bytes) and gathers a decoder
    /// layer just before it runs. Turns gradient checkpointing on by default, so that
    /// the backward pass gathers each layer again instead of keeping it.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().fsdp)]
    pub fsdp: bool,
    /// With --fsdp, gather the next layer while the current one computes.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().fsdp_prefetch)]
    pub fsdp_prefetch: bool,
    /// With several processes, keep the AdamW moments of 1/N of the adapter tensors on
    /// each rank (ZeRO stage 1: each rank updates those tensors and sends them to the
    /// others) instead of all of them on every rank. Default: on with --fsdp, where with
    /// gradient checkpointing the gradients are sharded too (ZeRO stage 2).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL")]
    pub shard_optimizer_state: Option<bool>,
    /// Rows of logits per cross-entropy chunk (in training each chunk holds one
    /// [N, vocab] tensor in the head's dtype at its peak; in evaluation two fp32 ones).
    #[arg(long, value_name = "N", default_value_t = defaults().loss_chunk_size)]
    pub loss_chunk_size: i64,
    /// Write a metrics.jsonl line every N steps.
    #[arg(long, value_name = "N", default_value_t = defaults().logging_steps)]
    pub logging_steps: u64,
    /// Also report the metrics to: none, or tensorboard (event files under OUTPUT/runs/).
    #[arg(long, value_enum, default_value_t = defaults().report_to)]
    pub report_to: ReportTo,
    /// Save a checkpoint every N steps (0: none).
    #[arg(long, value_name = "N", default_value_t = defaults().save_steps)]
    pub save_steps: u64,
    /// Keep only the newest N checkpoints (0: all).
    #[arg(long, value_name = "N", default_value_t = defaults().save_total_limit)]
    pub save_total_limit: usize,
    /// Continue from the newest complete checkpoint in --output.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = defaults().resume)]
    pub resume: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            data: None,
            format: None,
            output: PathBuf::from("runs/peft-rs"),
            eval_data: None,
            eval_holdout: 0,
            eval_steps: 0,
            peft_type: PeftType::Lora,
            feedforward_modules: Ia3Config::default().feedforward_modules,
            init_ia3_weights: true,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            init_weights: InitWeights::True,
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
            loftq_iter: 1,
            projection_prng_key: 0,
            save_projection: true,
            vera_dropout: 0.0,
            d_initial: 0.1,
            lora: LoraConfig::training(),
            share_lora_dropout: true,
            neftune_noise_alpha: 0.0,
            neftune_mode: NeftuneMode::Paper,
            neftune_noise: NoiseDistribution::Uniform,
            regularizers: Vec::new(),
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 2e-4,
            output_router_logits: None,
            router_aux_loss_coef: None,
            weight_decay: 0.0,
            loraplus_lr_ratio: None,
            loraplus_weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            lr_scheduler_type: Schedule::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.03,
            max_grad_norm: 1.0,
            num_train_epochs: 1.0,
            max_steps: 0,
            max_seq_length: 512,
            train_on_prompt: false,
            packing: false,
            group_by_length: true,
            seed: 42,
            device: DeviceArg::Auto,
            dtype: DtypeArg::Auto,
            quantize: None,
            bnb_4bit_use_double_quant: false,
            bnb_4bit_compute_dtype: None,
            gradient_checkpointing: None,
            gradient_checkpointing_keep_mlp: false,
            gradient_checkpointing_keep_attention: false,
            lora_compute_dtype: DtypeArg::Auto,
            tf32: false,
            nproc: 1,
            dist_backend: crate::dist::Backend::Auto,
            dist_timeout: 600,
            fsdp: false,
            fsdp_prefetch: true,
            shard_optimizer_state: None,
            loss_chunk_size: LOSS_CHUNK_SIZE,
            logging_steps: 1,
            report_to: ReportTo::None,
            save_steps: 0,
            save_total_limit: 0,
            resume: false,
        }
    }
}

/// One setting that differs between a saved run and the present settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// The field name.
    pub field: String,
    /// Its value in the saved run (JSON).
    pub saved: serde_json::Value,
    /// Its value now (JSON).
    pub now: serde_json::Value,
}

impl TrainConfig {
    /// Reads a TOML (`.toml`), YAML (`.yaml`/`.yml`) or JSON (`.json`, such
    /// as a run's `training_args.json`) file of settings (any field left out
    /// keeps its default). Errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = super::settings_file::read(path)?;
        Self::from_value(value, path)
    }

    /// The settings of a parsed settings file `path`. Values that record a
    /// past run rather than set this one ([`RECORDED_FIELDS`]) are left out
    /// with a note.
    pub fn from_value(mut value: serde_json::Value, path: &Path) -> Result<Self> {
        let Some(fields) = value.as_object_mut() else {
            anyhow::bail!("{}: expected a table of settings", path.display());
        };
        for &f in RECORDED_FIELDS {
            if fields.remove(f).is_some() {
                eprintln!(
                    "note: {}: `{f}` records how a run was made and is not read from a settings file \
                     (set the process count with --nproc or torchrun)",
                    path.display()
                );
            }
        }
        // Every field over the defaults (flattened parts included), and no
        // field the settings do not have.
        let serde_json::Value::Object(mut all) = serde_json::to_value(Self::default())? else {
            unreachable!("TrainConfig serialises to an object");
        };
        for (k, v) in std::mem::take(fields) {
            let key = if k == "r" { "lora_rank".to_owned() } else { k };
            if !all.contains_key(&key) {
                let mut known: Vec<&String> = all.keys().collect();
                known.sort();
                anyhow::bail!(
                    "{}: unknown field `{key}`; the settings are: {}",
                    path.display(),
                    known
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            all.insert(key, v);
        }
        let culprit = first_bad_field(&all);
        serde_path_to_error::deserialize(serde_json::Value::Object(all)).map_err(|e| {
            // serde's `flatten` (the LoRA part) hides the path of a bad value,
            // so the field is found by trying them one at a time.
            let field = match e.path().to_string() {
                p if p == "." => culprit.unwrap_or(p),
                p => p,
            };
            anyhow::anyhow!(
                "{}: {}{}",
                path.display(),
                if field == "." {
                    String::new()
                } else {
                    format!("field `{field}`: ")
                },
                one_line(&e.into_inner().to_string())
            )
        })
    }

    /// The settings that differ from `saved` among those that change the
    /// data, the model or the loss curve (all but [`RESUMABLE_CHANGES`]).
    pub fn differences_from(&self, saved: &TrainConfig) -> Vec<Difference> {
        let as_map = |c: &TrainConfig| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => unreachable!("TrainConfig serialises to an object"),
        };
        let (now, before) = (as_map(self), as_map(saved));
        now.into_iter()
            .filter(|(k, _)| !RESUMABLE_CHANGES.contains(&k.as_str()))
            .filter_map(|(k, v)| {
                let old = before.get(&k).cloned().unwrap_or(serde_json::Value::Null);
                (old != v).then_some(Difference {
                    field: k,
                    saved: old,
                    now: v,
                })
            })
            .collect()
    }

    /// Whether each decoder layer is recomputed in the backward pass: as
    /// asked, else with a quantized or sharded (`--fsdp`) base only.
    pub fn checkpointing(&self) -> bool {
        self.gradient_checkpointing
            .unwrap_or(self.quantize.is_some() || self.fsdp)
    }

    /// How the decoder checkpoints: [`Self::checkpointing`], keeping the
    /// frozen products the two `gradient_checkpointing_keep_*` settings name.
    pub fn checkpointing_mode(&self) -> Checkpointing {
        let keep = KeptProducts {
            attention: self.gradient_checkpointing_keep_attention,
            mlp: self.gradient_checkpointing_keep_mlp,
        };
        Checkpointing::new(self.checkpointing(), keep)
    }

    /// Whether the optimizer state is sharded over the ranks: as asked,
    /// else with a sharded base (`--fsdp`) only.
    pub fn shards_optimizer_state(&self) -> bool {
        self.shard_optimizer_state.unwrap_or(self.fsdp)
    }

    /// The dtype of the LoRA matmuls on `device` over a frozen base whose
    /// layers output `base_output` (`auto`: that dtype, as under autocast).
    pub fn lora_compute_kind(&self, base_output: tch::Kind, device: tch::Device) -> tch::Kind {
        match self.lora_compute_dtype {
            DtypeArg::Auto => base_output,
            d => d.resolve(device),
        }
    }

    /// The bitsandbytes quantization these settings ask for, with the
    /// compute dtype defaulting to the model dtype `kind`.
    pub fn quantization(&self, kind: tch::Kind, device: tch::Device) -> Option<BnbQuantization> {
        let compute = self
            .bnb_4bit_compute_dtype
            .map_or(kind, |d| d.resolve(device));
        self.quantize
            .map(|q| q.config(self.bnb_4bit_use_double_quant, compute))
    }

    /// Every regularizer these settings ask for, in order: NEFTune's short
    /// form (`neftune_noise_alpha` > 0) first, then `regularizers`. Naming
    /// NEFTune both ways is refused (it would add the noise twice).
    pub fn regularizer_specs(&self) -> Result<Vec<RegularizerSpec>> {
        let mut specs = Vec::new();
        if self.neftune_noise_alpha > 0.0 {
            if self.regularizers.iter().any(|r| r.kind == "neftune") {
                anyhow::bail!(
                    "NEFTune is asked for twice: by neftune_noise_alpha (--neftune-alpha) and by a `neftune` regularizer; keep one"
                );
            }
            specs.push(RegularizerSpec {
                kind: "neftune".into(),
                params: [
                    (
                        "alpha".to_owned(),
                        serde_json::json!(self.neftune_noise_alpha),
                    ),
                    (
                        "mode".to_owned(),
                        serde_json::json!(self.neftune_mode.to_string()),
                    ),
                    (
                        "noise".to_owned(),
                        serde_json::json!(self.neftune_noise.to_string()),
                    ),
                ]
                .into(),
            });
        }
        specs.extend(self.regularizers.iter().cloned());
        Ok(specs)
    }

    /// The LoRA configuration these settings describe, for the adapter of
    /// a model read from `base_model_name_or_path`.
    pub fn lora_config(&self, base_model_name_or_path: &Path) -> LoraConfig {
        let init_lora_weights = match self.lora.init_lora_weights {
            InitLoraWeights::Loftq { .. } => InitLoraWeights::Loftq {
                iters: self.loftq_iter,
            },
            other => other,
        };
        LoraConfig {
            base_model_name_or_path: Some(recorded_base(base_model_name_or_path)),
            init_lora_weights,
            ..self.lora.clone()
        }
    }

    /// The adapter configuration (of `peft_type`'s method) these settings
    /// describe, for a model read from `base_model_name_or_path`.
    pub fn adapter_config(&self, base_model_name_or_path: &Path) -> AdapterConfig {
        match self.peft_type {
            PeftType::Lora => self.lora_config(base_model_name_or_path).into(),
            PeftType::Ia3 => Ia3Config {
                target_modules: self.lora.target_modules.clone(),
                exclude_modules: self.lora.exclude_modules.clone(),
                feedforward_modules: self.feedforward_modules.clone(),
                init_ia3_weights: self.init_ia3_weights,
                base_model_name_or_path: Some(recorded_base(base_model_name_or_path)),
            }
            .into(),
            PeftType::Loha => LohaConfig {
                lycoris: self.lycoris_config(base_model_name_or_path),
                init_weights: self.init_weights != InitWeights::False,
            }
            .into(),
            PeftType::Lokr => LokrConfig {
                lycoris: self.lycoris_config(base_model_name_or_path),
                init_weights: self.init_weights,
                decompose_both: self.decompose_both,
                decompose_factor: self.decompose_factor,
                rank_dropout_scale: self.rank_dropout_scale,
            }
            .into(),
            PeftType::Vera => VeraConfig {
                r: self.lora.r,
                target_modules: self.lora.target_modules.clone(),
                exclude_modules: self.lora.exclude_modules.clone(),
                layers_to_transform: self.lora.layers_to_transform.clone(),
                projection_prng_key: self.projection_prng_key,
                save_projection: self.save_projection,
                vera_dropout: self.vera_dropout,
                d_initial: self.d_initial,
                init_weights: self.init_weights != InitWeights::False,
                base_model_name_or_path: Some(recorded_base(base_model_name_or_path)),
            }
            .into(),
        }
    }

    /// The settings LoHa and LoKr share: LoRA's rank, alpha, targeting and
    /// patterns, with the LyCORIS dropouts.
    fn lycoris_config(&self, base_model_name_or_path: &Path) -> LycorisConfig {
        let l = &self.lora;
        LycorisConfig {
            r: l.r,
            alpha: l.lora_alpha,
            rank_dropout: self.rank_dropout,
            module_dropout: self.module_dropout,
            target_modules: l.target_modules.clone(),
            exclude_modules: l.exclude_modules.clone(),
            layers_to_transform: l.layers_to_transform.clone(),
            rank_pattern: l.rank_pattern.clone(),
            alpha_pattern: l.alpha_pattern.clone(),
            base_model_name_or_path: Some(recorded_base(base_model_name_or_path)),
        }
    }
}

/// How a base is recorded in an adapter's configuration: a base from the
/// Hub cache by its id, as PEFT does, else its path.
fn recorded_base(dir: &Path) -> String {
    crate::hub::id_of_snapshot(dir).unwrap_or_else(|| dir.display().to_string())
}

/// The adapter method (PEFT's `peft_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PeftType {
    /// LoRA and its variants.
    #[serde(alias = "LORA")]
    Lora,
    /// IA³.
    #[serde(alias = "IA3")]
    Ia3,
    /// LoHa (reads `lora_rank` and `lora_alpha` as its `r` and `alpha`).
    #[serde(alias = "LOHA")]
    Loha,
    /// LoKr (reads `lora_rank` and `lora_alpha` as its `r` and `alpha`).
    #[serde(alias = "LOKR")]
    Lokr,
    /// VeRA (reads `lora_rank` as its `r`).
    #[serde(alias = "VERA")]
    Vera,
}

/// The first field of `all` whose value alone fails to deserialise over the
/// defaults, where the whole object fails without a path.
fn first_bad_field(all: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let serde_json::Value::Object(defaults) = serde_json::to_value(TrainConfig::default()).ok()?
    else {
        return None;
    };
    all.iter().find_map(|(k, v)| {
        let mut one = defaults.clone();
        one.insert(k.clone(), v.clone());
        serde_json::from_value::<TrainConfig>(serde_json::Value::Object(one))
            .is_err()
            .then(|| k.clone())
    })
}
