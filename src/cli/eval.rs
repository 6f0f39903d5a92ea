//! `peft-rs eval`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::{AdapterArgs, ModelArgs};
use crate::device::resolve_model_dir;
use crate::peft_model;

#[derive(Args, Debug)]
// The flags of `peft-rs eval` (a plain comment: a doc comment would replace the subcommand's help).
#[allow(missing_docs)]
pub struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) adapters: AdapterArgs,
    /// Data file (same formats as train).
    #[arg(long, value_name = "FILE")]
    pub(crate) data: PathBuf,
    /// Data format (default: detected).
    #[arg(long, value_enum)]
    pub(crate) format: Option<crate::data::DataFormat>,
    /// Truncate examples to N tokens.
    #[arg(long, default_value_t = 512)]
    pub(crate) max_seq_len: usize,
    /// Examples per batch (for the loss and for generation).
    #[arg(long, default_value_t = 16)]
    pub(crate) batch_size: usize,
    /// Include prompt tokens in the loss.
    #[arg(long)]
    pub(crate) train_on_prompt: bool,
    /// Also answer each prompt greedily and report exact match, ROUGE-L against the
    /// reference, and the answers' length, distinct-2, repetition and truncation.
    #[arg(long, alias = "answers")]
    pub(crate) exact_match: bool,
    /// With --exact-match: new tokens per answer (default: the reference's length + 16).
    #[arg(long, value_name = "N")]
    pub(crate) max_new_tokens: Option<usize>,
    /// With --exact-match: write every answer with its reference to this JSONL file.
    #[arg(long, value_name = "FILE")]
    pub(crate) answers_out: Option<PathBuf>,
    /// With --exact-match, print this many (prompt answer, reference) pairs.
    #[arg(long, default_value_t = 0)]
    pub(crate) show: usize,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `peft-rs eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let adapters = a.adapters.dirs()?;
    if let Some(out) = &a.answers_out {
        // Checked before anything slow: an output is never one of the inputs.
        let model_dir = resolve_model_dir(a.model.model.clone())?;
        let mut inputs = vec![
            ("data", a.data.as_path()),
            ("base model", model_dir.as_path()),
        ];
        inputs.extend(adapters.iter().map(|d| ("adapter", d.as_path())));
        crate::outputs::refuse_overlap("--answers-out", out, &inputs)?;
    }
    if a.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    let mut base = a.model.load()?;
    peft_model::load_adapters(&mut base.model, &adapters, &a.adapters.weights)?;
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
        super::args::merge_for_decoding(&mut base.model, a.adapters.merge_for_decoding)?;
        let (report, records) = crate::answers::answer_report(
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
