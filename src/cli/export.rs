//! `peft-rs export gguf`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::device::resolve_model_dir;
use crate::gguf::{export, ExportOptions, TensorType};

#[derive(Args, Debug)]
#[allow(missing_docs)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub(crate) format: ExportFormat,
}

#[derive(Subcommand, Debug)]
#[allow(missing_docs)]
pub enum ExportFormat {
    /// Write a GGUF file for llama.cpp, Ollama and LM Studio: a LoRA adapter
    /// (--adapter alone, or with --adapter-only), or the base model with any
    /// --adapter merged in (--model).
    #[command(args_override_self = true)]
    Gguf(GgufArgs),
}

/// `--outtype`: the type of 2-D tensors.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum OutType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Args, Debug)]
#[allow(missing_docs)]
pub struct GgufArgs {
    /// Base model directory or Hub id. With --adapter and without --adapter-only, the
    /// adapters are merged into it; alone, it is exported as it is. Without --model, an
    /// adapter's base is its base_model_name_or_path, else the default model.
    #[arg(long, value_name = "DIR|ID")]
    pub(crate) model: Option<PathBuf>,
    /// PEFT adapter directory or Hub id (repeat to merge several into --model).
    #[arg(long, value_name = "DIR|ID")]
    pub(crate) adapter: Vec<PathBuf>,
    /// Export the adapter itself (llama.cpp's --lora), even when --model is given.
    #[arg(long)]
    pub(crate) adapter_only: bool,
    /// The GGUF file to write (written under a temporary name, then renamed).
    #[arg(long, value_name = "FILE.gguf")]
    pub(crate) output: PathBuf,
    /// Type of 2-D tensors: f32, f16, bf16 or q8_0 (1-D tensors stay f32).
    #[arg(long, value_enum, default_value = "f16")]
    pub(crate) outtype: OutType,
    /// Also write an Ollama Modelfile beside the output.
    #[arg(long)]
    pub(crate) ollama: bool,
    /// Replace --output (and the Modelfile) if they exist.
    #[arg(long)]
    pub(crate) overwrite: bool,
}

/// `peft-rs export ...`.
pub fn run(a: ExportArgs) -> Result<()> {
    match a.format {
        ExportFormat::Gguf(g) => run_gguf(g),
    }
}

fn run_gguf(a: GgufArgs) -> Result<()> {
    crate::signals::install();
    let adapters: Vec<PathBuf> = a
        .adapter
        .iter()
        .map(|d| crate::hub::resolve(d, crate::hub::RepoKind::Adapter))
        .collect::<Result<_>>()?;
    let adapter_only = a.adapter_only || (a.model.is_none() && !adapters.is_empty());
    let model = match (&a.model, adapters.first()) {
        (None, Some(first)) => resolve_model_dir(base_of_adapter(first)?)?,
        (m, _) => resolve_model_dir(m.clone())?,
    };
    if a.output.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!("--output {}: name the file FILE.gguf", a.output.display());
    }
    let outtype = match a.outtype {
        OutType::F32 => TensorType::F32,
        OutType::F16 => TensorType::F16,
        OutType::Bf16 => TensorType::BF16,
        OutType::Q8_0 => TensorType::Q8_0,
    };
    let modelfile = a.output.with_file_name("Modelfile");
    if a.ollama && modelfile.exists() && !a.overwrite {
        bail!(
            "{}: already exists (pass --overwrite to replace it)",
            modelfile.display()
        );
    }
    let opts = ExportOptions {
        model,
        adapters,
        adapter_only,
        output: a.output,
        outtype,
        overwrite: a.overwrite,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let r = export(&opts)?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let what = if adapter_only {
        "LoRA adapter"
    } else if opts.adapters.is_empty() {
        "model"
    } else {
        "merged model"
    };
    eprintln!(
        "wrote {what} for llama.cpp architecture {}: {} tensors, {} ({:.1} MB) in {:.1} s",
        r.architecture,
        r.tensors,
        outtype.name(),
        r.bytes as f64 / 1e6,
        r.seconds
    );
    if r.folded_scalings > 0 {
        eprintln!(
            "note: {} module(s) scale differently from adapter.lora.alpha / r (rsLoRA or rank/alpha patterns); their scaling is folded into lora_b",
            r.folded_scalings
        );
    }
    if a.ollama {
        let text = modelfile_text(&opts, adapter_only)?;
        peft_adapters::fsio::write_atomic(&modelfile, text.as_bytes())?;
        eprintln!(
            "wrote {} (ollama create NAME -f {})",
            modelfile.display(),
            modelfile.display()
        );
    }
    println!("{}", opts.output.display());
    Ok(())
}

/// The base an adapter names in `base_model_name_or_path` when it is a
/// folder here or a Hub id; `None` (the default model) otherwise.
fn base_of_adapter(dir: &Path) -> Result<Option<PathBuf>> {
    let config = dir.join(peft_adapters::lora::files::CONFIG_FILE);
    let text = peft_adapters::fsio::read_regular_string(
        &config,
        peft_adapters::fsio::MAX_JSON_BYTES,
        "adapter config",
    )?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", config.display()))?;
    let Some(base) = json["base_model_name_or_path"]
        .as_str()
        .filter(|s| !s.is_empty())
    else {
        return Ok(None);
    };
    let path = PathBuf::from(base);
    let usable = path.is_dir() || crate::hub::HubId::parse(base).is_some();
    Ok(usable.then_some(path))
}

/// An Ollama Modelfile: FROM the model (for an adapter, the base's GGUF,
/// expected beside it), ADAPTER, the chat template where it is one of the
/// formats Ollama writes as a Go template, and the end-of-turn stop tokens.
fn modelfile_text(opts: &ExportOptions, adapter_only: bool) -> Result<String> {
    let file = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut text = String::new();
    if adapter_only {
        let base = format!("{}.gguf", file(&opts.model));
        text += &format!(
            "# The base model as GGUF, beside this file: peft-rs export gguf --model {} --output {base}\n",
            opts.model.display()
        );
        text += &format!("FROM ./{base}\nADAPTER ./{}\n", file(&opts.output));
    } else {
        text += &format!("FROM ./{}\n", file(&opts.output));
    }
    let tokenizer = crate::tokenizer::Tokenizer::from_model_dir(&opts.model)?;
    let template = tokenizer.chat_template().unwrap_or_default();
    let (go, stops): (Option<&str>, &[&str]) = if template.contains("<|im_start|>") {
        (Some(CHATML), &["<|im_start|>", "<|im_end|>"])
    } else if template.contains("<|start_header_id|>") {
        (
            Some(LLAMA3),
            &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        )
    } else {
        (None, &[])
    };
    match go {
        Some(t) => text += &format!("TEMPLATE \"\"\"{t}\"\"\"\n"),
        None => text += "# No TEMPLATE: Ollama reads the chat template from the GGUF's tokenizer.chat_template.\n",
    }
    for s in stops {
        text += &format!("PARAMETER stop \"{s}\"\n");
    }
    Ok(text)
}

/// ChatML (SmolLM, Qwen) as an Ollama Go template.
const CHATML: &str = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";
/// Llama 3's header format as an Ollama Go template.
const LLAMA3: &str = "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n";
