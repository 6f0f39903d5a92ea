//! The `peft-rs` command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Deserialize;

use crate::device::{dtype_name, resolve_model_dir, DeviceArg, DtypeArg};
use crate::generate::{generate_in_batches, GenerationConfig};
use crate::merge::{merge_to_dir, MergeOptions};
use crate::models::Pretrained;
use crate::peft_model;
use crate::quant::Quantize;
use crate::tokenizer::Message;
use crate::train::{TrainConfig, Trainer};

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
    #[command(allow_negative_numbers = true, args_override_self = true)]
    Generate(GenerateArgs),
    /// Merge adapters into the base weights and write a Hugging Face model directory.
    #[command(args_override_self = true)]
    Merge(MergeArgs),
    /// Fine-tune LoRA adapters on instruction data (NEFTune with --neftune-alpha).
    #[command(allow_negative_numbers = true, args_override_self = true)]
    Train(Box<TrainArgs>),
    /// Print the loss and perplexity of a model (with or without adapters) on a data file.
    #[command(allow_negative_numbers = true, args_override_self = true)]
    Eval(EvalArgs),
    /// Draw training and evaluation loss against step for one or more runs into a PNG.
    Plot(PlotArgs),
}

/// Where the model comes from and where it runs.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    /// Defaults to the SmolLM2-135M-Instruct that ./scripts/setup.sh converts into models/.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N; auto uses CUDA when libtorch can.
    #[arg(long, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Dtype of the frozen weights: auto is fp32 on CPU (bf16 is far slower there), bf16 on CUDA.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// Allow TF32 tensor cores for fp32 matmuls on CUDA (faster, about 10 bits of mantissa).
    #[arg(long)]
    pub tf32: bool,
    /// Store the frozen linear layers quantized as bitsandbytes does (nf4, fp4 or int8);
    /// embeddings, norms and lm_head stay in --dtype.
    #[arg(long, value_enum, value_name = "nf4|fp4|int8")]
    pub quantize: Option<Quantize>,
    /// Quantize the 4-bit absmax values again (double quantization; default false as in transformers).
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = false)]
    pub bnb_4bit_use_double_quant: bool,
    /// Dtype the 4-bit matmuls run in (default: --dtype).
    #[arg(long, value_enum)]
    pub bnb_4bit_compute_dtype: Option<DtypeArg>,
}

impl ModelArgs {
    /// Loads the model and tokenizer these arguments name.
    pub fn load(&self) -> Result<Pretrained> {
        if self.tf32 {
            crate::device::allow_tf32();
        }
        let place = crate::device::Placement::resolve(self.device, self.dtype)?;
        let dir = resolve_model_dir(self.model.clone())?;
        let start = std::time::Instant::now();
        let quantize = self.quantization(place.kind, place.device)?;
        let model = Pretrained::load_quantized(&dir, place.kind, place.device, quantize.as_ref())?;
        eprintln!(
            "{}: {}{}, loaded in {:.2} s",
            dir.display(),
            place.describe(),
            self.quantize
                .map(|q| format!(", {q:?} base"))
                .unwrap_or_default(),
            start.elapsed().as_secs_f64()
        );
        Ok(model)
    }

    /// What `--quantize` and the `--bnb-4bit-*` flags ask for.
    pub fn quantization(
        &self,
        kind: tch::Kind,
        device: tch::Device,
    ) -> Result<Option<crate::quant::BnbQuantization>> {
        let four_bit_flags =
            self.bnb_4bit_use_double_quant || self.bnb_4bit_compute_dtype.is_some();
        match self.quantize {
            None if four_bit_flags => {
                anyhow::bail!("--bnb-4bit-use-double-quant and --bnb-4bit-compute-dtype need --quantize nf4 or fp4")
            }
            Some(Quantize::Int8) if four_bit_flags => anyhow::bail!(
                "--bnb-4bit-use-double-quant and --bnb-4bit-compute-dtype apply to --quantize nf4 or fp4, not int8"
            ),
            None => Ok(None),
            Some(q) => {
                let compute = self
                    .bnb_4bit_compute_dtype
                    .map_or(kind, |d| d.resolve(device));
                Ok(Some(q.config(self.bnb_4bit_use_double_quant, compute)))
            }
        }
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
    /// Fold the adapters into the weights before decoding (one matmul per layer instead of
    /// three): auto (on CUDA), always, never. Quantized layers keep theirs unmerged.
    #[arg(long, value_enum, default_value_t = peft_model::MergeForDecoding::Auto)]
    pub merge_for_decoding: peft_model::MergeForDecoding,
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
    /// Prompts generated together (left-padded; each stops at its own EOS).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

/// Runs the command line with the regularizers of `registry` and exits:
/// 0 on success, 128 + the signal when a signal stopped the work, 1 on any
/// other error, which ends as one line on stderr — libtorch failures (an
/// allocation that does not fit, say) included, which tch reports by
/// panicking.
pub fn exit_with(registry: &crate::regularizers::Registry) -> ! {
    // A panic prints nothing itself; it is reported below as one line.
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| main_with(registry)));
    let payload = match result {
        Ok(Ok(())) => std::process::exit(0),
        Ok(Err(e)) => {
            // `{:#}` joins the context chain on one line: "what: why: cause".
            eprintln!("error: {e:#}");
            // Stopped by a signal: the shell's convention, 128 + the signal.
            let code = e
                .downcast_ref::<crate::signals::Interrupted>()
                .map_or(1, |i| 128 + i.signal);
            std::process::exit(code);
        }
        Err(payload) => payload,
    };
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    eprintln!("error: {}", describe_panic(text));
    std::process::exit(1)
}

/// Parses the command line and runs it, with the regularizers of
/// `registry` (a program built on peft-rs registers its own there, and its
/// `--regularizer` flags and settings files can then name them).
pub fn main_with(registry: &crate::regularizers::Registry) -> Result<()> {
    crate::signals::ignore_file_size_limit();
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => usage_error(e)?,
    };
    let cli = Cli::from_arg_matches(&matches).or_else(usage_error)?;
    match cli.command {
        Command::Env => env(),
        Command::Generate(a) => generate_cmd(a),
        Command::Merge(a) => merge_cmd(a),
        Command::Train(a) => train_cmd(
            *a,
            matches
                .subcommand_matches("train")
                .expect("the train subcommand was parsed"),
            registry,
        ),
        Command::Eval(a) => eval_cmd(a),
        Command::Plot(a) => plot_cmd(a),
    }
}

/// Help and version print as clap prints them; a usage error becomes one
/// line (clap's message with its hint, without the usage block).
fn usage_error<T>(e: clap::Error) -> Result<T> {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let line = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect::<Vec<_>>()
        .join(" ");
    bail!("{}", line.strip_prefix("error: ").unwrap_or(&line))
}

fn env() -> Result<()> {
    println!("peft-rs {}", env!("CARGO_PKG_VERSION"));
    // If the linker dropped libtorch_cuda, CUDA is silently unusable; say so.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let (version, lib_dir) = libtorch_version(&maps);
    println!("libtorch: {version} (tch 0.24), from {lib_dir}");
    let cuda = tch::Cuda::is_available();
    println!(
        "libtorch_cuda linked: {}",
        if maps.contains("libtorch_cuda.so") {
            "yes"
        } else {
            "no"
        }
    );
    let smi = crate::device::NvidiaSmi::query();
    match &smi {
        Some(smi) => {
            println!("nvidia driver: {}", smi.driver);
            for (i, (name, cap)) in smi.gpus.iter().enumerate() {
                println!("gpu {i}: {name}, compute capability {cap}");
            }
        }
        None => println!("nvidia driver: none found (no nvidia-smi)"),
    }
    println!("cuda usable: {cuda}");
    if let Some(why) = crate::device::cpu_fallback_reason(smi.as_ref()) {
        println!("{why}");
    }
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
        // Kernels for this GPU exist in this build only if they run: try them.
        for i in 0..tch::Cuda::device_count() as usize {
            match crate::device::prove_device(tch::Device::Cuda(i)) {
                Ok(()) => println!(
                    "cuda:{i}: bf16 matmul and attention ran (this libtorch has kernels for it)"
                ),
                Err(e) => println!(
                    "cuda:{i}: FAILED a bf16 matmul/attention: {}",
                    first_line(&e.to_string())
                ),
            }
        }
    }
    let mut devices = vec!["cpu".to_owned()];
    if cuda {
        devices.extend((0..tch::Cuda::device_count()).map(|i| format!("cuda:{i}")));
    }
    println!("devices: {}", devices.join(", "));
    println!("cpu threads: {}", tch::get_num_threads());
    let (c10d, nccl) = crate::dist::capabilities();
    println!(
        "multi-process training (c10d): {}",
        match (c10d, nccl) {
            (false, _) => "not built (Gloo's headers were missing: run ./scripts/setup.sh and rebuild)",
            (true, false) => "gloo (NCCL not built: it needs a CUDA libtorch and CUDA's CCCL and crt headers; run ./scripts/setup.sh, or set PEFT_RS_CUDA_INCLUDE to a CUDA toolkit's include folder, and rebuild)",
            (true, true) => "gloo, nccl",
        }
    );
    let auto = crate::device::place(
        crate::device::DeviceArg::Auto,
        None,
        crate::device::visible_gpus(),
    )?;
    println!(
        "--device auto picks: {}",
        crate::device::Placement {
            device: auto,
            kind: crate::device::DtypeArg::Auto.resolve(auto)
        }
        .describe()
    );
    Ok(())
}

/// The libtorch version, read from the installation that is loaded (the torch
/// wheel's `version.py`, or a libtorch archive's `build-version`), and its folder.
fn libtorch_version(maps: &str) -> (String, String) {
    let Some(lib) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(Path::new)
        .and_then(Path::parent)
    else {
        return ("unknown".into(), "unknown".into());
    };
    let root = lib.parent().unwrap_or(lib);
    let version = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim_matches(['\'', '"']).to_owned())
        })
        .or_else(|| {
            std::fs::read_to_string(root.join("build-version"))
                .ok()
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    (format!("PyTorch {version}"), lib.display().to_string())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Folds the adapters of dense layers into their weights before decoding
/// when `--merge-for-decoding` says so (by default on CUDA only), and says
/// what it did.
fn merge_for_decoding(
    model: &mut crate::models::LlamaForCausalLM,
    when: peft_model::MergeForDecoding,
) -> Result<()> {
    let has_adapters = !peft_model::trainable_parameters(model).is_empty();
    if has_adapters && when.merges(model.device().is_cuda()) {
        let (merged, kept) = peft_model::merge_for_decoding(model)?;
        eprintln!(
            "adapters merged into {merged} layers for decoding{}",
            if kept > 0 {
                format!("; {kept} quantized layers keep theirs unmerged (merging would round the update away)")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// Says once that some answers were capped to fit the model's positions.
fn note_capped(capped: usize, asked: usize, positions: Option<usize>) {
    if capped > 0 {
        eprintln!(
            "note: --max-new-tokens {asked} capped for {capped} prompt(s) so that prompt and answer fit the model's {} positions (max_position_embeddings)",
            positions.unwrap_or(0)
        );
    }
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
    merge_for_decoding(&mut base.model, a.adapters.merge_for_decoding)?;
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
    let mut prompts = Vec::with_capacity(requests.len());
    let mut shown = Vec::with_capacity(requests.len());
    for req in &requests {
        match req {
            Request::Plain(p) => {
                prompts.push(base.tokenizer.encode(p, true)?);
                shown.push(p.clone());
            }
            Request::Chat(m) => {
                prompts.push(base.tokenizer.encode_chat(m, true)?);
                shown.push(m.last().map(|m| m.content.clone()).unwrap_or_default());
            }
        }
    }
    let stdout = std::io::stdout();
    let start = std::time::Instant::now();
    let mut new_tokens = 0usize;
    let mut limits = vec![cfg.max_new_tokens; prompts.len()];
    note_capped(
        crate::generate::fit_positions(
            &prompts,
            &mut limits,
            base.model.config.max_position_embeddings,
        )?,
        cfg.max_new_tokens,
        base.model.config.max_position_embeddings,
    );
    generate_in_batches(
        &base.model,
        &prompts,
        &limits,
        &cfg,
        a.batch_size,
        |i, new| {
            new_tokens += new.len();
            let new_u32: Vec<u32> = new.iter().map(|&t| t as u32).collect();
            let text = base.tokenizer.decode(&new_u32, true)?;
            let mut out = stdout.lock();
            if a.json {
                let obj = serde_json::json!({
                    "index": i,
                    "prompt": shown[i],
                    "completion": text,
                    "prompt_token_ids": prompts[i],
                    "token_ids": new,
                    "finished_by_eos": new.last().is_some_and(|t| cfg.eos_token_ids.contains(t)),
                });
                writeln!(out, "{obj}")?;
            } else {
                if requests.len() > 1 {
                    writeln!(out, "### {}", shown[i].lines().next().unwrap_or(""))?;
                }
                writeln!(out, "{text}")?;
                if requests.len() > 1 {
                    writeln!(out)?;
                }
            }
            Ok(())
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} prompt(s), {new_tokens} new tokens in {secs:.2} s ({:.1} tokens/s, {:.2} prompts/s, batches of {})",
        prompts.len(),
        new_tokens as f64 / secs.max(1e-9),
        prompts.len() as f64 / secs.max(1e-9),
        a.batch_size
    );
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
    let text = peft_adapters::fsio::read_regular_string(file, 1 << 30, "prompts file")?;
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
    /// dtype of the written weights: fp32, bf16 or fp16 (default, or auto: as in the base).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Replace --output if it exists.
    #[arg(long)]
    overwrite: bool,
}

fn merge_cmd(a: MergeArgs) -> Result<()> {
    crate::signals::install();
    let dtype = a
        .dtype
        .filter(|d| *d != DtypeArg::Auto)
        .map(|d| d.resolve(tch::Device::Cpu));
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

/// `peft-rs train`: the settings of [`TrainConfig`], each a flag, plus a settings file.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML, YAML or JSON file with the settings (field names as in training_args.json, which can
    /// itself be given); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: TrainConfig,
    /// Same as --group-by-length false.
    #[arg(long, hide = true)]
    no_group_by_length: bool,
}

impl TrainArgs {
    /// The settings: defaults, then --config, then the flags given on the
    /// command line (`matches` tells which were given).
    pub fn to_config(&self, matches: &ArgMatches) -> Result<TrainConfig> {
        let file = self
            .config
            .as_deref()
            .map(TrainConfig::from_file)
            .transpose()?;
        let given: Vec<String> = train_setting_args()
            .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
            .collect();
        let mut c = match &file {
            None => self.settings.clone(),
            Some(from_file) => {
                // Field by field, through JSON: only what was typed replaces the file's value.
                let mut merged = serde_json::to_value(from_file)?;
                let flags = serde_json::to_value(&self.settings)?;
                for id in &given {
                    merged[id.as_str()] = flags[id.as_str()].clone();
                }
                serde_json::from_value(merged)?
            }
        };
        if self.no_group_by_length {
            c.group_by_length = false;
        }
        if let Err(e) = c.validate() {
            let value = serde_json::to_value(&c)?[e.field].to_string();
            if given.iter().any(|g| g == e.field) {
                bail!("{} {value}: {}", flag_of(e.field), e.problem);
            }
            match &self.config {
                Some(f) => bail!(
                    "{}: field `{}` = {value}: {}",
                    f.display(),
                    e.field,
                    e.problem
                ),
                None => bail!("{e}"),
            }
        }
        Ok(c)
    }
}

/// The ids (= field names) of the arguments [`TrainConfig`] defines.
fn train_setting_args() -> impl Iterator<Item = String> {
    <TrainConfig as Args>::augment_args(clap::Command::new("train"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect::<Vec<_>>()
        .into_iter()
}

/// `--lr` for `learning_rate`: the flag that sets a [`TrainConfig`] field.
pub fn flag_of(field: &str) -> String {
    <TrainConfig as Args>::augment_args(clap::Command::new("train"))
        .get_arguments()
        .find(|a| a.get_id() == field)
        .and_then(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .unwrap_or_else(|| format!("`{field}`"))
}

fn train_cmd(
    a: TrainArgs,
    matches: &ArgMatches,
    registry: &crate::regularizers::Registry,
) -> Result<()> {
    let cfg = a.to_config(matches)?;
    let dist = crate::dist::DistEnv::from_env()?;
    let our_worker = std::env::var_os(crate::dist::launch::WORKER_MARK).is_some();
    if let (true, Some(d), false) = (cfg.nproc > 1, &dist, our_worker) {
        bail!(
            "--nproc {} while WORLD_SIZE={} is set: a launcher (torchrun, a scheduler) already started the processes; leave out --nproc",
            cfg.nproc,
            d.world_size
        );
    }
    if cfg.nproc > 1 && dist.is_none() {
        cfg.validate()?;
        return crate::dist::launch_local(cfg.nproc);
    }
    crate::signals::install();
    let mut trainer = Trainer::new(cfg, registry)?;
    let s = trainer.run()?;
    if dist.is_some_and(|d| d.rank != 0) {
        return Ok(());
    }
    let summary = serde_json::json!({
        "steps": s.steps, "skipped_steps": s.skipped_steps, "seconds": s.seconds,
        "tokens_per_second": s.tokens_per_second, "final_train_loss": s.final_train_loss,
        "eval_loss_before": s.eval_loss_before, "eval_loss_after": s.eval_loss_after,
        "world_size": trainer.rank_and_world().1, "all_reduce_seconds": trainer.all_reduce_seconds, "wait_for_ranks_seconds": trainer.wait_seconds,
        "frozen_weight_bytes": s.frozen_weight_bytes,
        "quantized_bytes_per_param": s.quantized_bytes_per_param,
    });
    peft_adapters::fsio::write_atomic(
        &s.output.join("train_summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!(
        "== training finished: {} steps in {:.1} s ({:.0} tokens/s)",
        s.steps, s.seconds, s.tokens_per_second
    );
    println!("final training loss: {:.4}", s.final_train_loss);
    if let (Some(b), Some(after)) = (s.eval_loss_before, s.eval_loss_after) {
        println!(
            "eval loss: {b:.4} -> {after:.4} (perplexity {:.2} -> {:.2})",
            b.exp(),
            after.exp()
        );
    } else if let Some(after) = s.eval_loss_after {
        println!("eval loss: {after:.4} (perplexity {:.2})", after.exp());
    }
    println!("adapter (PEFT format): {}", s.output.display());
    println!("metrics: {}", s.output.join("metrics.jsonl").display());
    Ok(())
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// Data file (same formats as train).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Data format (default: detected).
    #[arg(long, value_enum)]
    format: Option<crate::data::DataFormat>,
    /// Truncate examples to N tokens.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Examples per batch (for the loss and for generation).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Include prompt tokens in the loss.
    #[arg(long)]
    train_on_prompt: bool,
    /// Also answer each prompt greedily and report exact match, ROUGE-L against the
    /// reference, and the answers' length, distinct-2, repetition and truncation.
    #[arg(long, alias = "answers")]
    exact_match: bool,
    /// With --exact-match: new tokens per answer (default: the reference's length + 16).
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// With --exact-match: write every answer with its reference to this JSONL file.
    #[arg(long, value_name = "FILE")]
    answers_out: Option<PathBuf>,
    /// With --exact-match, print this many (prompt answer, reference) pairs.
    #[arg(long, default_value_t = 0)]
    show: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if let Some(out) = &a.answers_out {
        // Checked before anything slow: an output is never one of the inputs.
        let model_dir = resolve_model_dir(a.model.model.clone())?;
        let mut inputs = vec![
            ("data", a.data.as_path()),
            ("base model", model_dir.as_path()),
        ];
        inputs.extend(a.adapters.adapter.iter().map(|d| ("adapter", d.as_path())));
        crate::outputs::refuse_overlap("--answers-out", out, &inputs)?;
    }
    if a.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    let mut base = a.model.load()?;
    peft_model::load_adapters(&mut base.model, &a.adapters.adapter, &a.adapters.weights)?;
    let eos = base.completion_eos()?;
    let opts = crate::data::DataOptions {
        format: a.format,
        max_seq_len: a.max_seq_len,
        train_on_prompt: a.train_on_prompt,
    };
    let ds = crate::data::load_dataset(&a.data, &base.tokenizer, eos, &opts)?;
    let pad = base.tokenizer.pad_token_id().map(i64::from).unwrap_or(eos);
    let tokens: usize = ds
        .examples
        .iter()
        .map(|e| e.labels.iter().filter(|&&l| l != -100).count())
        .sum();
    let loss = crate::train::mean_loss(
        &base.model,
        &ds,
        a.batch_size,
        pad,
        crate::train::config::LOSS_CHUNK_SIZE,
        &mut Default::default(),
    )?;
    let report = if a.exact_match {
        // The loss above ran unmerged; answers may use merged weights.
        merge_for_decoding(&mut base.model, a.adapters.merge_for_decoding)?;
        let (report, records) = answer_report(
            &base,
            &a.data,
            opts.format,
            a.show,
            a.batch_size,
            a.max_new_tokens,
        )?;
        if let Some(path) = &a.answers_out {
            let text: String = records.iter().map(|r| format!("{r}\n")).collect();
            peft_adapters::fsio::write_atomic(path, text.as_bytes())?;
        }
        Some(report)
    } else {
        None
    };
    if a.json {
        let mut out = serde_json::json!({"loss": loss, "perplexity": loss.exp(),
            "examples": ds.examples.len(), "label_tokens": tokens});
        if let Some(r) = &report {
            for (k, v) in serde_json::to_value(r)?.as_object().into_iter().flatten() {
                out[k] = v.clone();
            }
        }
        println!("{out}");
    } else {
        println!(
            "loss {loss:.4}  perplexity {:.3}  ({} examples, {tokens} label tokens)",
            loss.exp(),
            ds.examples.len()
        );
        if let Some(r) = report {
            let s = &r.stats;
            println!(
                "exact match {:.1}%  ROUGE-L {:.3}  answers: {:.1} tokens, {:.0} characters, distinct-2 {:.3}, \
                 repetition {:.3}, {:.1}% at the token limit  ({:.2} prompts/s)",
                100.0 * r.exact_match,
                r.rouge_l,
                s.mean_tokens,
                s.mean_chars,
                s.distinct_2,
                s.repetition_2,
                100.0 * s.truncated,
                r.prompts_per_second
            );
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
struct PlotArgs {
    /// Run directories (each with the metrics.jsonl that `train` writes).
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long, value_name = "FILE.png")]
    output: PathBuf,
    /// Title of the picture.
    #[arg(long, default_value = "LoRA fine-tuning loss")]
    title: String,
    /// Width in pixels (100 to 8192).
    #[arg(long, default_value_t = 1200)]
    width: u32,
    /// Height in pixels (100 to 8192).
    #[arg(long, default_value_t = 700)]
    height: u32,
    /// A logarithmic loss axis (useful when runs start far above where they end).
    #[arg(long)]
    log_y: bool,
    /// Legend labels, one per run, comma-separated (default: the run directories' names).
    #[arg(long, value_delimiter = ',', value_name = "LABEL,LABEL,...")]
    labels: Vec<String>,
}

fn plot_cmd(a: PlotArgs) -> Result<()> {
    if !a.labels.is_empty() && a.labels.len() != a.runs.len() {
        bail!(
            "--labels has {} labels for {} runs; give one per run",
            a.labels.len(),
            a.runs.len()
        );
    }
    let mut runs = a
        .runs
        .iter()
        .map(|r| crate::plot::read_run(r))
        .collect::<Result<Vec<_>>>()?;
    for (run, label) in runs.iter_mut().zip(&a.labels) {
        run.label.clone_from(label);
    }
    let opts = crate::plot::PlotOptions {
        title: a.title,
        size: (a.width, a.height),
        log_y: a.log_y,
    };
    crate::plot::plot(&runs, &a.output, &opts)?;
    println!("{}", a.output.display());
    Ok(())
}

/// What `eval --exact-match` measures from greedy answers.
#[derive(Debug, serde::Serialize)]
struct AnswerReport {
    /// Share of answers equal to the reference (whitespace-trimmed).
    exact_match: f64,
    /// Mean ROUGE-L F1 of the answers against the references.
    rouge_l: f64,
    /// Length, diversity, repetition and truncation of the answers.
    #[serde(flatten)]
    stats: crate::answers::AnswerStats,
    /// Seconds spent generating, and prompts per second.
    seconds: f64,
    prompts_per_second: f64,
}

/// Greedy answers to every prompt of a data file, batched, scored against the
/// references and described by their statistics; `show` pairs are printed.
fn answer_report(
    base: &Pretrained,
    data: &Path,
    format: Option<crate::data::DataFormat>,
    show: usize,
    batch_size: usize,
    max_new_tokens: Option<usize>,
) -> Result<(AnswerReport, Vec<serde_json::Value>)> {
    let cases = crate::data::generation_cases(data, &base.tokenizer, format)?;
    // Without a fixed limit, room for the reference and 16 tokens more.
    let mut limits: Vec<usize> = cases
        .iter()
        .map(|c| match max_new_tokens {
            Some(n) => Ok(n),
            None => Ok((base.tokenizer.encode(&c.reference, false)?.len() + 16).min(512)),
        })
        .collect::<Result<_>>()?;
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let positions = base.model.config.max_position_embeddings;
    let capped = crate::generate::fit_positions(&prompts, &mut limits, positions)?;
    if let Some(n) = max_new_tokens {
        note_capped(capped, n, positions);
    }
    let cfg = GenerationConfig {
        max_new_tokens: limits.iter().copied().max().unwrap_or(1),
        eos_token_ids: base.eos_token_ids.clone(),
        ..GenerationConfig::default()
    };
    let bar = progress_bar(cases.len() as u64, "generating");
    let (mut hits, mut rouge) = (0usize, 0.0);
    let mut answers = Vec::with_capacity(cases.len());
    let mut records = Vec::with_capacity(cases.len());
    let start = std::time::Instant::now();
    generate_in_batches(
        &base.model,
        &prompts,
        &limits,
        &cfg,
        batch_size,
        |i, new| {
            let ended = new.last().is_some_and(|t| cfg.eos_token_ids.contains(t));
            let ids: Vec<u32> = new.iter().map(|&t| t as u32).collect();
            let text = base.tokenizer.decode(&ids, true)?;
            let reference = cases[i].reference.trim();
            let hit = text.trim() == reference;
            hits += hit as usize;
            rouge += crate::answers::rouge_l(text.trim(), reference);
            if i < show {
                // Printed directly: indicatif drops println while its bar is hidden (no terminal).
                eprintln!(
                    "{} {:?} (reference {:?})",
                    if hit { "✓" } else { "✗" },
                    text.trim(),
                    reference
                );
            }
            records.push(
                serde_json::json!({"index": i, "answer": text, "reference": reference,
            "tokens": new.len(), "hit_limit": !ended && new.len() >= limits[i]}),
            );
            answers.push(crate::answers::Answer {
                tokens: new.len(),
                hit_limit: !ended && new.len() >= limits[i],
                text,
            });
            bar.inc(1);
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let n = cases.len().max(1) as f64;
    Ok((
        AnswerReport {
            exact_match: hits as f64 / n,
            rouge_l: rouge / n,
            stats: crate::answers::stats(&answers),
            seconds,
            prompts_per_second: cases.len() as f64 / seconds.max(1e-9),
        },
        records,
    ))
}

/// A progress bar on a terminal; otherwise hidden (callers print their own lines).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{eta}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// One line for a panic: libtorch's own message when tch panicked with one
/// (`Torch("... not enough memory: you tried to allocate ...\nException raised from ...")`),
/// otherwise an internal error to report.
pub fn describe_panic(text: &str) -> String {
    if let Some(start) = text.find("Torch(") {
        let msg = text[start + 6..]
            .trim_start_matches("TchError(")
            .trim_start_matches('"');
        let first = msg
            .split("\\n")
            .next()
            .unwrap_or(msg)
            .trim_end_matches(['"', ')']);
        return format!("libtorch: {first}");
    }
    format!(
        "internal error (please report it): {}",
        text.lines().next().unwrap_or(text)
    )
}
