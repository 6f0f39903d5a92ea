//! Every training setting in one typed struct, filled from defaults, then a
//! `--config` file (TOML or YAML), then command-line flags. It is written to
//! `training_args.json` next to the adapter.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Learning-rate schedules (transformers' `get_scheduler` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Warmup, then constant.
    Constant,
    /// Warmup, then linear decay to 0.
    Linear,
    /// Warmup, then half a cosine down to 0.
    Cosine,
}

/// A complete training run's settings. Field names follow PEFT/TRL/transformers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Base model directory (None: the default model).
    pub model: Option<PathBuf>,
    /// Training data file.
    pub data: Option<PathBuf>,
    /// `alpaca`, `messages`, `prompt-completion` or `text` (None: detect).
    pub format: Option<String>,
    /// Output directory for the adapter, checkpoints and metrics.
    pub output: PathBuf,
    /// Evaluation data file.
    pub eval_data: Option<PathBuf>,
    /// Hold out this many training examples for evaluation (when no eval_data).
    pub eval_holdout: usize,
    /// Evaluate every N steps (0: only at the end).
    pub eval_steps: u64,

    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha (scaling = alpha / r).
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch.
    pub lora_dropout: f64,
    /// `all-linear`, or module names.
    pub target_modules: Vec<String>,
    /// rsLoRA scaling alpha / √r.
    pub use_rslora: bool,
    /// DoRA.
    pub use_dora: bool,

    /// NEFTune α (TRL's `neftune_noise_alpha`); 0 is off.
    pub neftune_noise_alpha: f64,
    /// `paper` (per-example length, no noise on padding) or `hf` (padded length).
    pub neftune_mode: String,
    /// `uniform` or `gaussian`.
    pub neftune_noise: String,

    /// Examples per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Learning-rate schedule.
    pub lr_scheduler_type: Schedule,
    /// Warmup steps (takes precedence over the ratio when > 0).
    pub warmup_steps: u64,
    /// Warmup as a fraction of all steps.
    pub warmup_ratio: f64,
    /// Gradient-norm clipping (0: off).
    pub max_grad_norm: f64,
    /// Passes over the data (ignored when max_steps > 0).
    pub num_train_epochs: f64,
    /// Stop after this many optimizer steps (0: use epochs).
    pub max_steps: u64,
    /// Truncate examples to this many tokens.
    pub max_seq_length: usize,
    /// Train on prompt tokens too.
    pub train_on_prompt: bool,
    /// Batch examples of similar length together.
    pub group_by_length: bool,
    /// Seed of everything random: init, order, dropout, noise.
    pub seed: u64,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// dtype of the frozen base: `auto`, `fp32`, `bf16`, `fp16`.
    pub dtype: String,
    /// Recompute each decoder layer in the backward pass to save memory.
    pub gradient_checkpointing: bool,
    /// Rows of logits computed at once by the cross-entropy.
    pub loss_chunk_size: i64,
    /// Log a metrics line every N steps.
    pub logging_steps: u64,
    /// Checkpoint every N steps (0: no checkpoints).
    pub save_steps: u64,
    /// Keep only the newest N checkpoints (0: keep all).
    pub save_total_limit: usize,
    /// Continue from the newest complete checkpoint in `output`.
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
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: vec!["all-linear".into()],
            use_rslora: false,
            use_dora: false,
            neftune_noise_alpha: 0.0,
            neftune_mode: "paper".into(),
            neftune_noise: "uniform".into(),
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 2e-4,
            weight_decay: 0.0,
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
            group_by_length: true,
            seed: 42,
            device: "auto".into(),
            dtype: "auto".into(),
            gradient_checkpointing: false,
            loss_chunk_size: 1024,
            logging_steps: 1,
            save_steps: 0,
            save_total_limit: 0,
            resume: false,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML (`.toml`) or YAML (`.yaml`/`.yml`) file of settings.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "toml" => toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string()))),
            "yaml" | "yml" => {
                serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            }
            _ => bail!("{}: give a .toml, .yaml or .yml file", path.display()),
        }
    }

    /// Rejects settings that cannot work, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let pos = |ok: bool, what: &str| -> Result<()> {
            if !ok {
                bail!("{what}");
            }
            Ok(())
        };
        pos(self.lora_rank > 0, "--lora-rank must be at least 1")?;
        pos(self.lora_alpha > 0.0, "--lora-alpha must be > 0")?;
        pos(
            (0.0..1.0).contains(&self.lora_dropout),
            "--lora-dropout must be in [0, 1)",
        )?;
        pos(
            self.neftune_noise_alpha >= 0.0,
            "--neftune-alpha must be >= 0 (0 is off)",
        )?;
        pos(
            self.per_device_train_batch_size > 0,
            "--batch-size must be at least 1",
        )?;
        pos(
            self.gradient_accumulation_steps > 0,
            "--grad-accum must be at least 1",
        )?;
        pos(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            "--lr must be > 0",
        )?;
        pos(self.weight_decay >= 0.0, "--weight-decay must be >= 0")?;
        pos(
            (0.0..1.0).contains(&self.adam_beta1) && (0.0..1.0).contains(&self.adam_beta2),
            "--adam-beta1/--adam-beta2 must be in [0, 1)",
        )?;
        pos(self.adam_epsilon > 0.0, "--adam-epsilon must be > 0")?;
        pos(
            (0.0..=1.0).contains(&self.warmup_ratio),
            "--warmup-ratio must be in [0, 1]",
        )?;
        pos(
            self.max_grad_norm >= 0.0,
            "--max-grad-norm must be >= 0 (0 is off)",
        )?;
        pos(
            self.max_steps > 0 || self.num_train_epochs > 0.0,
            "give --epochs > 0 or --max-steps > 0",
        )?;
        pos(self.max_seq_length >= 2, "--max-seq-len must be at least 2")?;
        pos(
            self.loss_chunk_size > 0,
            "--loss-chunk-size must be at least 1",
        )?;
        pos(self.logging_steps > 0, "--logging-steps must be at least 1")?;
        pos(
            !self.target_modules.is_empty(),
            "--target-modules must name at least one module",
        )?;
        self.neftune_mode
            .parse::<peft_regularizers::NeftuneMode>()?;
        self.neftune_noise
            .parse::<peft_regularizers::NoiseDistribution>()?;
        if let Some(f) = &self.format {
            f.parse::<crate::data::DataFormat>()?;
        }
        Ok(())
    }

    /// The LoRA configuration these settings describe.
    pub fn lora_config(&self, base_model_name_or_path: &Path) -> peft_adapters::lora::LoraConfig {
        use peft_adapters::lora::{LoraConfig, TargetModules};
        let target_modules =
            if self.target_modules.len() == 1 && self.target_modules[0] == "all-linear" {
                TargetModules::AllLinear
            } else {
                TargetModules::Names(self.target_modules.clone())
            };
        LoraConfig {
            r: self.lora_rank,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            base_model_name_or_path: Some(base_model_name_or_path.display().to_string()),
            ..LoraConfig::default()
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
