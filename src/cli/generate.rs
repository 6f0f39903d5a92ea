//! `peft-rs generate`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::{AdapterArgs, ModelArgs};
use crate::device::dtype_name;
use crate::generate::{generate_in_batches, note_capped, read_prompts, GenerationConfig, Request};
use crate::peft_model;
use crate::tokenizer::Message;

#[derive(Args, Debug)]
// The flags of `peft-rs generate` (a plain comment: a doc comment would replace the subcommand's help).
#[allow(missing_docs)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) adapters: AdapterArgs,
    /// Plain-text prompt, tokenized as `tokenizer(text)` (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub(crate) prompt: Vec<String>,
    /// Text sent as one user message through the model's chat template (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub(crate) chat: Vec<String>,
    /// File of prompts: one plain prompt per line, or JSONL objects with
    /// "prompt" (plain), "chat" (one user message) or "messages" (a chat).
    #[arg(long, value_name = "FILE")]
    pub(crate) prompts: Option<PathBuf>,
    /// Maximum number of new tokens per prompt.
    #[arg(long, default_value_t = 128)]
    pub(crate) max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f64,
    /// Nucleus sampling threshold (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f64,
    /// Keep only the K most likely tokens when sampling (0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Penalise tokens already present (transformers' repetition_penalty; 1 is off).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) repetition_penalty: f64,
    /// Print one JSON object per prompt instead of plain text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Prompts generated together (left-padded; each stops at its own EOS).
    #[arg(long, default_value_t = 16)]
    pub(crate) batch_size: usize,
}

/// `peft-rs generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
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
    peft_model::load_adapters(&mut base.model, &a.adapters.dirs()?, &a.adapters.weights)?;
    super::args::merge_for_decoding(&mut base.model, a.adapters.merge_for_decoding)?;
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
    let (prompts, shown): (Vec<Vec<u32>>, Vec<String>) = requests
        .iter()
        .map(|r| r.encode(&base.tokenizer))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
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
    let mut memory = crate::memory::MemoryWatch::default();
    memory.sample();
    eprintln!("memory: {memory}");
    Ok(())
}
