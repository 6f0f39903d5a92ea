//! The `peft-rs` command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::device::{dtype_name, parse_device, parse_dtype, resolve_model_dir};
use crate::generate::{generate, GenerationConfig};
use crate::merge::{merge_to_dir, MergeOptions};
use crate::models::Pretrained;
use crate::peft_model;
use crate::tokenizer::Message;

/// Train, load, save and merge LoRA/PEFT adapters for causal language models.
#[derive(Parser, Debug)]
#[command(name = "peft-rs", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the libtorch build, the devices it sees and whether CUDA is usable.
    Env,
    /// Generate text from a base model, with or without adapters (greedy unless --temperature > 0).
    Generate(GenerateArgs),
    /// Merge adapters into the base weights and write a Hugging Face model directory.
    Merge(MergeArgs),
}

/// Where the model comes from and where it runs.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    /// Defaults to the SmolLM2-135M-Instruct that ./scripts/setup.sh converts into models/.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N; auto uses CUDA when libtorch can.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Dtype of the frozen weights: auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl ModelArgs {
    /// Loads the model and tokenizer these arguments name.
    pub fn load(&self) -> Result<Pretrained> {
        let device = parse_device(&self.device)?;
        let kind = parse_dtype(&self.dtype, device)?;
        let dir = resolve_model_dir(self.model.clone())?;
        Pretrained::load(&dir, kind, device)
    }
}

/// Adapters to apply on top of the base model.
#[derive(Args, Debug, Clone)]
pub struct AdapterArgs {
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors);
    /// repeat to combine several, with --weights.
    #[arg(long, value_name = "DIR")]
    pub adapter: Vec<PathBuf>,
    /// One weight per adapter, combined as PEFT's add_weighted_adapter(combination_type="linear").
    #[arg(long, value_delimiter = ',', value_name = "W,W,...")]
    pub weights: Vec<f64>,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// Plain-text prompt, tokenized as `tokenizer(text)` (repeatable).
    #[arg(long, value_name = "TEXT")]
    prompt: Vec<String>,
    /// Text sent as one user message through the model's chat template (repeatable).
    #[arg(long, value_name = "TEXT")]
    chat: Vec<String>,
    /// File of prompts: one plain prompt per line, or JSONL objects with
    /// "prompt" (plain), "chat" (one user message) or "messages" (a chat).
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Maximum number of new tokens per prompt.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the K most likely tokens when sampling (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Penalise tokens already present (transformers' repetition_penalty; 1 is off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Print one JSON object per prompt instead of plain text.
    #[arg(long)]
    json: bool,
}

/// Parses the command line and runs it.
pub fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Env => env(),
        Command::Generate(a) => generate_cmd(a),
        Command::Merge(a) => merge_cmd(a),
    }
}

fn env() -> Result<()> {
    println!("peft-rs {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch: tch 0.24 (PyTorch 2.11.0)");
    let cuda = tch::Cuda::is_available();
    // If the linker dropped libtorch_cuda, CUDA is silently unusable; say so.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    println!(
        "libtorch_cuda linked: {}",
        if maps.contains("libtorch_cuda.so") {
            "yes"
        } else {
            "no"
        }
    );
    println!("cuda usable: {cuda}");
    if cuda {
        println!(
            "cuda devices: {} (cudnn {})",
            tch::Cuda::device_count(),
            if tch::Cuda::cudnn_is_available() {
                "available"
            } else {
                "not available"
            }
        );
    }
    let mut devices = vec!["cpu".to_owned()];
    if cuda {
        devices.extend((0..tch::Cuda::device_count()).map(|i| format!("cuda:{i}")));
    }
    println!("devices: {}", devices.join(", "));
    println!("cpu threads: {}", tch::get_num_threads());
    let auto = tch::Device::cuda_if_available();
    println!(
        "--device auto picks: {}",
        if auto == tch::Device::Cpu {
            "cpu"
        } else {
            "cuda:0"
        }
    );
    Ok(())
}

/// One request to generate from.
enum Request {
    Plain(String),
    Chat(Vec<Message>),
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let mut requests: Vec<Request> = a.prompt.iter().cloned().map(Request::Plain).collect();
    requests.extend(
        a.chat
            .iter()
            .map(|c| Request::Chat(vec![Message::user(c.clone())])),
    );
    if let Some(file) = &a.prompts {
        requests.extend(read_prompts(file)?);
    }
    if requests.is_empty() {
        bail!("nothing to generate from: give --prompt TEXT, --chat TEXT or --prompts FILE");
    }
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        eos_token_ids: vec![],
    };
    cfg.validate()?;
    let mut base = a.model.load()?;
    peft_model::load_adapters(&mut base.model, &a.adapters.adapter, &a.adapters.weights)?;
    let cfg = GenerationConfig {
        eos_token_ids: base.eos_token_ids.clone(),
        ..cfg
    };
    eprintln!(
        "model {} ({}, {} on {:?})",
        base.dir.display(),
        base.model.config.model_type,
        dtype_name(base.model.kind()),
        base.model.device()
    );
    let stdout = std::io::stdout();
    for (i, req) in requests.iter().enumerate() {
        let (ids, shown) = match req {
            Request::Plain(p) => (base.tokenizer.encode(p, true)?, p.clone()),
            Request::Chat(m) => (
                base.tokenizer.encode_chat(m, true)?,
                m.last().map(|m| m.content.clone()).unwrap_or_default(),
            ),
        };
        let start = std::time::Instant::now();
        let new = generate(&base.model, &ids, &cfg)?;
        let secs = start.elapsed().as_secs_f64();
        let new_u32: Vec<u32> = new.iter().map(|&t| t as u32).collect();
        let text = base.tokenizer.decode(&new_u32, true)?;
        let mut out = stdout.lock();
        if a.json {
            let obj = serde_json::json!({
                "index": i,
                "prompt": shown,
                "completion": text,
                "prompt_token_ids": ids,
                "token_ids": new,
                "finished_by_eos": new.last().is_some_and(|t| cfg.eos_token_ids.contains(t)),
                "seconds": secs,
            });
            writeln!(out, "{obj}")?;
        } else {
            if requests.len() > 1 {
                writeln!(out, "### {}", shown.lines().next().unwrap_or(""))?;
            }
            writeln!(out, "{text}")?;
            if requests.len() > 1 {
                writeln!(out)?;
            }
        }
        eprintln!(
            "[{}/{}] {} tokens in {:.2} s ({:.1} tokens/s)",
            i + 1,
            requests.len(),
            new.len(),
            secs,
            new.len() as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    prompt: Option<String>,
    chat: Option<String>,
    messages: Option<Vec<Message>>,
}

fn read_prompts(file: &Path) -> Result<Vec<Request>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let jsonl = file.extension().is_some_and(|e| e == "jsonl");
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !jsonl {
            out.push(Request::Plain(line.to_owned()));
            continue;
        }
        let where_ = || format!("{}:{}", file.display(), n + 1);
        let p: PromptLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: expected {{\"prompt\"|\"chat\"|\"messages\": ...}}",
                where_()
            )
        })?;
        out.push(match (p.prompt, p.chat, p.messages) {
            (Some(t), None, None) => Request::Plain(t),
            (None, Some(t), None) => Request::Chat(vec![Message::user(t)]),
            (None, None, Some(m)) if !m.is_empty() => Request::Chat(m),
            _ => bail!(
                "{}: give exactly one of \"prompt\", \"chat\" or a non-empty \"messages\"",
                where_()
            ),
        });
    }
    if out.is_empty() {
        bail!("{}: no prompts in the file", file.display());
    }
    Ok(out)
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// Base model directory (defaults to the embedded default model).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// Output model directory (written to a temporary directory, then renamed).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// dtype of the written weights: fp32, bf16 or fp16 (default: as in the base).
    #[arg(long)]
    dtype: Option<String>,
    /// Replace --output if it exists.
    #[arg(long)]
    overwrite: bool,
}

fn merge_cmd(a: MergeArgs) -> Result<()> {
    let dtype = a
        .dtype
        .as_deref()
        .map(|d| parse_dtype(d, tch::Device::Cpu))
        .transpose()?;
    let opts = MergeOptions {
        base: resolve_model_dir(a.model)?,
        adapters: a.adapters.adapter,
        weights: a.adapters.weights,
        output: a.output,
        dtype,
        overwrite: a.overwrite,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let r = merge_to_dir(&opts)?;
    eprintln!(
        "merged {} adapter(s) into {} of {} tensors ({:.1} MB, largest tensor {:.1} MB) in {:.1} s",
        opts.adapters.len(),
        r.tensors_merged,
        r.tensors_written,
        r.bytes_written as f64 / 1e6,
        r.largest_tensor_bytes as f64 / 1e6,
        r.seconds
    );
    println!("{}", opts.output.display());
    Ok(())
}
