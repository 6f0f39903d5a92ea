//! Base models: reading a Hugging Face model directory into a frozen decoder.
//!
//! One file per concept the decoder is made of — [`config`] (what
//! `config.json` says), [`rope`], [`attention`] (with masks and the KV
//! cache), [`mlp`], [`decoder`] (layers, the model and its forward path) and
//! [`loader`] (weights into modules) — and one thin file per architecture
//! saying how its configuration differs: [`llama`], [`mistral`], [`qwen2`],
//! [`qwen3`], [`gemma3`], [`phi3`], and the mixtures of experts
//! [`qwen3_moe`] and [`mixtral`] (their sparse MLP in [`moe`]).

pub mod attention;
pub mod config;
pub mod decoder;
pub mod gemma3;
pub mod gpt_oss;
pub mod llama;
pub mod loader;
pub mod mistral;
pub mod mixtral;
pub mod mlp;
pub mod moe;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;
pub mod rope;
mod sharded;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};

pub use attention::{AttentionLayout, DecoderInput, KvCache};
pub use config::{LlamaConfig, OUTPUT_HEAD};
pub use decoder::{Checkpointing, DecoderOutput, KeptProducts, LlamaForCausalLM};

use crate::config_json::RawConfig;
use crate::quant::{BnbQuantization, QuantPlan};
use crate::weights::WeightFiles;
use loader::Weights;

/// The architectures peft-rs reads, by `model_type`.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "gpt_oss",
    "gemma3_text",
    "gemma3 (text tower)",
    "phi3",
];

/// Parses `DIR/config.json` for a supported architecture.
pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let raw = RawConfig::read(dir)?;
    match raw.model_type()? {
        "llama" => llama::config(&raw),
        "mistral" => mistral::config(&raw),
        "qwen2" => qwen2::config(&raw),
        "qwen3" => qwen3::config(&raw),
        "qwen3_moe" => qwen3_moe::config(&raw),
        "mixtral" => mixtral::config(&raw),
        "gpt_oss" => gpt_oss::config(&raw),
        "gemma3_text" => gemma3::config(&raw),
        "gemma3" => gemma3::multimodal_config(&raw),
        "phi3" => phi3::config(&raw),
        other => bail!(
            "{}: field `model_type` is `{other}`, which peft-rs does not support (supported: {})",
            raw.path.display(),
            SUPPORTED_MODEL_TYPES.join(", ")
        ),
    }
}

/// Loads a Hugging Face model directory: `config.json` plus
/// `model.safetensors` or sharded safetensors with their index.
///
/// Weights are converted to `kind` on `device` and never require grad.
pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<LlamaForCausalLM> {
    load_with_config(dir, read_config(dir)?, kind, device, None, None)
}

/// [`load`], with the linear layers quantized as `quantize` asks
/// (`--quantize`). A checkpoint whose config.json has a bitsandbytes
/// `quantization_config` loads quantized as it is, with or without `quantize`.
pub fn load_quantized(
    dir: &Path,
    kind: Kind,
    device: Device,
    quantize: Option<&BnbQuantization>,
) -> Result<LlamaForCausalLM> {
    load_with_config(dir, read_config(dir)?, kind, device, quantize, None)
}

/// A random model (see [`random`]) whose linear layers are quantized as `quantize` asks.
pub fn random_quantized(
    config: LlamaConfig,
    kind: Kind,
    device: Device,
    quantize: &BnbQuantization,
) -> Result<LlamaForCausalLM> {
    let used = RefCell::new(BTreeSet::new());
    let source = loader::RandomWeights { std: 0.02 };
    let plan = QuantPlan::choose(None, Some(quantize), Path::new("config.json"))?;
    LlamaForCausalLM::load(
        config,
        &Weights::new(&source, kind, device, &used).with_quantization(plan.as_ref()),
    )
}

/// A model of `config`'s shapes with random weights (N(0, 0.02), norms 1),
/// for benchmarks of sizes no checkpoint is at hand for.
pub fn random(config: LlamaConfig, kind: Kind, device: Device) -> Result<LlamaForCausalLM> {
    let used = RefCell::new(BTreeSet::new());
    let source = loader::RandomWeights { std: 0.02 };
    LlamaForCausalLM::load(config, &Weights::new(&source, kind, device, &used))
}

/// The weights of model directory `dir` whose config is `config` (see
/// [`Pretrained::load_sharded`]).
pub fn load_with_config(
    dir: &Path,
    config: LlamaConfig,
    kind: Kind,
    device: Device,
    quantize: Option<&BnbQuantization>,
    shard: Option<(usize, usize)>,
) -> Result<LlamaForCausalLM> {
    if device.is_cuda() {
        // A library caller may name a GPU without asking peft-rs about CUDA first.
        crate::cuda_library::ensure_loaded();
    }
    let files = WeightFiles::from_model_dir(dir)?;
    let config = config.with_stored_names(|n| files.contains(n));
    check_layer_count(dir, &config, &files)?;
    let stored = crate::quant::read_quantization(dir)?;
    let plan = QuantPlan::choose(stored, quantize, &dir.join("config.json"))?;
    let used = RefCell::new(BTreeSet::new());
    let mut weights = Weights::new(&files, kind, device, &used).with_quantization(plan.as_ref());
    if let Some((rank, world)) = shard {
        weights = weights.sharded(rank, world);
    }
    let model = LlamaForCausalLM::load(config, &weights)?;
    let used = used.into_inner();
    let head = format!("{}.weight", model.config.stored_head);
    let ignorable = |n: &str| n == head || n.ends_with("rotary_emb.inv_freq");
    let in_skipped_tower = |n: &str| {
        model
            .config
            .skipped_towers
            .iter()
            .any(|t| n.starts_with(&format!("{t}.")))
    };
    let (skipped, unused): (Vec<&str>, Vec<&str>) = files
        .names()
        .filter(|n| !used.contains(*n) && !ignorable(n))
        .partition(|n| in_skipped_tower(n));
    if !skipped.is_empty() {
        let towers: Vec<&str> = model
            .config
            .skipped_towers
            .iter()
            .map(String::as_str)
            .filter(|t| skipped.iter().any(|n| n.starts_with(&format!("{t}."))))
            .collect();
        note_skipped_towers(dir, &towers, skipped.len());
    }
    if !unused.is_empty() {
        eprintln!(
            "warning: {}: {} tensor(s) not used by the {} model, e.g. {}",
            dir.display(),
            unused.len(),
            model.config.model_type,
            unused[0]
        );
    }
    Ok(model)
}

/// Says once per model directory and process (on stderr) that a multimodal
/// checkpoint's other towers are not read.
fn note_skipped_towers(dir: &Path, towers: &[&str], tensors: usize) {
    static NOTED: std::sync::Mutex<BTreeSet<std::path::PathBuf>> =
        std::sync::Mutex::new(BTreeSet::new());
    let first = NOTED
        .lock()
        .map(|mut n| n.insert(dir.to_path_buf()))
        .unwrap_or(true);
    if first {
        eprintln!(
            "note: {}: a multimodal checkpoint; peft-rs reads its text model only and skips {} \
             ({tensors} tensors), so inputs are text only",
            dir.display(),
            towers
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(" and ")
        );
    }
}

/// `num_hidden_layers` must be the number of layers the checkpoint holds.
fn check_layer_count(dir: &Path, config: &LlamaConfig, files: &WeightFiles) -> Result<()> {
    let layers = format!("{}.layers.", config.stored_decoder);
    let present = files
        .names()
        .filter_map(|n| {
            n.strip_prefix(&layers)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    if present != config.num_hidden_layers {
        bail!(
            "{}: field `num_hidden_layers` is {}, but the weights hold {present} layers; the config does not belong to these weights",
            dir.join("config.json").display(),
            config.num_hidden_layers
        );
    }
    Ok(())
}

/// A base model with its tokenizer, ready for generation or training.
pub struct Pretrained {
    /// The model directory.
    pub dir: std::path::PathBuf,
    /// The frozen decoder.
    pub model: LlamaForCausalLM,
    /// Its tokenizer and chat template.
    pub tokenizer: crate::tokenizer::Tokenizer,
    /// Token ids that end generation: `generation_config.json`, else
    /// `config.json`, else the tokenizer's `eos_token`.
    pub eos_token_ids: Vec<i64>,
}

impl Pretrained {
    /// Loads model and tokenizer and checks that they belong together.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        Self::load_quantized(dir, kind, device, None)
    }

    /// [`Pretrained::load`] with the linear layers quantized as `quantize`
    /// asks (see [`load_quantized`]).
    pub fn load_quantized(
        dir: &Path,
        kind: Kind,
        device: Device,
        quantize: Option<&BnbQuantization>,
    ) -> Result<Self> {
        Self::load_sharded(dir, kind, device, quantize, None)
    }

    /// [`Pretrained::load_quantized`], keeping only the slice `(rank, world)`
    /// of each frozen linear weight and of the embeddings when `shard` is
    /// given (`--fsdp`, see [`crate::dist::fsdp`]).
    pub fn load_sharded(
        dir: &Path,
        kind: Kind,
        device: Device,
        quantize: Option<&BnbQuantization>,
        shard: Option<(usize, usize)>,
    ) -> Result<Self> {
        ModelFiles::read(dir)?.load_weights(kind, device, quantize, shard)
    }

    /// The token appended to completions and texts in training data (see
    /// [`ModelFiles::completion_eos`]).
    pub fn completion_eos(&self) -> Result<i64> {
        completion_eos(&self.tokenizer, &self.eos_token_ids, &self.dir)
    }
}

/// What a model directory holds besides the weights, read and checked
/// first: the config, the tokenizer (which must fit the config's
/// vocabulary) and the ids that end generation. Training reads its data
/// with these before the weights load, so that a bad record is reported
/// at once and the data's memory is not counted as the model's.
pub struct ModelFiles {
    /// The model directory.
    pub dir: std::path::PathBuf,
    /// Its config.json.
    pub config: LlamaConfig,
    /// Its tokenizer and chat template.
    pub tokenizer: crate::tokenizer::Tokenizer,
    /// As [`Pretrained::eos_token_ids`].
    pub eos_token_ids: Vec<i64>,
}

impl ModelFiles {
    /// Reads the config, the tokenizer and the generation config of `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let config = read_config(dir)?;
        let tokenizer = crate::tokenizer::Tokenizer::from_model_dir(dir)?;
        // Checked before the weights are read: a mismatch names the cause, not a shape.
        tokenizer.check_fits(config.vocab_size, &dir.join("config.json"))?;
        let mut eos = generation_eos(dir)?;
        if eos.is_empty() {
            eos = config.eos_token_ids.clone();
        }
        if eos.is_empty() {
            eos.extend(tokenizer.eos_token_id().map(i64::from));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            eos_token_ids: eos,
        })
    }

    /// Loads the weights (see [`Pretrained::load_sharded`]).
    pub fn load_weights(
        self,
        kind: Kind,
        device: Device,
        quantize: Option<&BnbQuantization>,
        shard: Option<(usize, usize)>,
    ) -> Result<Pretrained> {
        let model = load_with_config(&self.dir, self.config, kind, device, quantize, shard)?;
        Ok(Pretrained {
            dir: self.dir,
            model,
            tokenizer: self.tokenizer,
            eos_token_ids: self.eos_token_ids,
        })
    }

    /// The token appended to completions and texts in training data:
    /// `tokenizer.eos_token`, as TRL appends it, else the first id of
    /// `generation_config.eos_token_id`. (Llama-3-Instruct's generation config
    /// starts with `<|end_of_text|>` while its tokenizer's EOS is
    /// `<|eot_id|>`, the token that ends a turn.)
    pub fn completion_eos(&self) -> Result<i64> {
        completion_eos(&self.tokenizer, &self.eos_token_ids, &self.dir)
    }
}

fn completion_eos(
    tokenizer: &crate::tokenizer::Tokenizer,
    eos_token_ids: &[i64],
    dir: &Path,
) -> Result<i64> {
    match tokenizer.eos_token_id() {
        Some(id) => Ok(i64::from(id)),
        None => eos_token_ids.first().copied().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the model defines no EOS token (tokenizer_config.json `eos_token`, \
                 generation_config.json or config.json `eos_token_id`)",
                dir.display()
            )
        }),
    }
}

fn generation_eos(dir: &Path) -> Result<Vec<i64>> {
    let path = dir.join("generation_config.json");
    if !path.exists() && !path.is_symlink() {
        return Ok(vec![]);
    }
    let text = peft_adapters::fsio::read_regular_string(
        &path,
        peft_adapters::fsio::MAX_JSON_BYTES,
        "generation config",
    )?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()))?;
    crate::config_json::token_ids_of(json.get("eos_token_id"))
        .with_context(|| format!("{}: field `eos_token_id`", path.display()))
}
