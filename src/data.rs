//! Instruction data: reading Alpaca, chat `messages`, `prompt`/`completion`
//! and plain `text` records, tokenizing them with the loss on completions
//! only, and batching with right padding.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::Value;
use tch::Tensor;

use crate::tokenizer::{Message, Tokenizer};

/// Label value that takes no loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// The record shapes peft-rs reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// `instruction`, `input`, `output`, with the Stanford Alpaca prompt template.
    Alpaca,
    /// `messages`: a list of `{role, content}` rendered with the chat template.
    Messages,
    /// `prompt` and `completion`.
    PromptCompletion,
    /// `text`: every token is trained on.
    Text,
}

impl FromStr for DataFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "alpaca" => Self::Alpaca,
            "messages" => Self::Messages,
            "prompt-completion" => Self::PromptCompletion,
            "text" => Self::Text,
            other => {
                bail!("--format `{other}`: expected alpaca, messages, prompt-completion or text")
            }
        })
    }
}

impl DataFormat {
    /// The name used on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Alpaca => "alpaca",
            Self::Messages => "messages",
            Self::PromptCompletion => "prompt-completion",
            Self::Text => "text",
        }
    }

    fn required(&self) -> &'static [&'static str] {
        match self {
            Self::Alpaca => &["instruction", "output"],
            Self::Messages => &["messages"],
            Self::PromptCompletion => &["prompt", "completion"],
            Self::Text => &["text"],
        }
    }

    fn detect(record: &Value) -> Option<Self> {
        let has = |k: &str| record.get(k).is_some();
        if has("instruction") && has("output") {
            Some(Self::Alpaca)
        } else if has("messages") {
            Some(Self::Messages)
        } else if has("prompt") && has("completion") {
            Some(Self::PromptCompletion)
        } else if has("text") {
            Some(Self::Text)
        } else {
            None
        }
    }
}

/// How records become examples.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// The format, or `None` to detect it from the first record.
    pub format: Option<DataFormat>,
    /// Longer examples are truncated to this many tokens.
    pub max_seq_len: usize,
    /// Take the loss on prompt tokens too.
    pub train_on_prompt: bool,
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<i64>,
    /// The target at each position ([`IGNORE`] where no loss is taken);
    /// the model's prediction at position i is scored against `labels[i+1]`.
    pub labels: Vec<i64>,
}

/// A tokenized data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its record format.
    pub format: DataFormat,
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples left with no label token after truncation (not kept).
    pub dropped: usize,
}

/// Reads and tokenizes a data file: a JSON array or JSONL. A malformed record
/// stops everything with its file, line and field named.
pub fn load_dataset(
    path: &Path,
    tok: &Tokenizer,
    eos_token_id: i64,
    opts: &DataOptions,
) -> Result<Dataset> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let records = parse_records(path, &text)?;
    if records.is_empty() {
        bail!("{}: no records (the dataset is empty)", path.display());
    }
    let format = match opts.format {
        Some(f) => f,
        None => DataFormat::detect(&records[0].1).with_context(|| {
            format!(
                "{}:{}: cannot tell the format: expected Alpaca {{instruction, input, output}}, \
                 {{messages: [...]}}, {{prompt, completion}} or {{text}} (or pass --format)",
                path.display(),
                records[0].0
            )
        })?,
    };
    let tokenized: Vec<Result<Example>> = records
        .par_iter()
        .map(|(line, rec)| {
            tokenize(rec, format, tok, eos_token_id, opts.train_on_prompt)
                .with_context(|| format!("{}:{line}", path.display()))
        })
        .collect();
    let mut examples = Vec::with_capacity(tokenized.len());
    let (mut truncated, mut dropped) = (0, 0);
    for ex in tokenized {
        let mut ex = ex?;
        if ex.input_ids.len() > opts.max_seq_len {
            ex.input_ids.truncate(opts.max_seq_len);
            ex.labels.truncate(opts.max_seq_len);
            truncated += 1;
        }
        // Position 0 is never a target (nothing predicts it).
        if ex.labels.iter().skip(1).all(|&l| l == IGNORE) {
            dropped += 1;
            continue;
        }
        examples.push(ex);
    }
    if examples.is_empty() {
        bail!(
            "{}: no example has a token to learn from ({dropped} of {} left only prompt tokens within --max-seq-len {}); \
             raise --max-seq-len or check the completions",
            path.display(),
            records.len(),
            opts.max_seq_len
        );
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        format,
        examples,
        truncated,
        dropped,
    })
}

/// (line number, record) pairs from a JSON array or JSONL text.
pub fn parse_records(path: &Path, text: &str) -> Result<Vec<(usize, Value)>> {
    let line_of = |offset: usize| text[..offset].bytes().filter(|&b| b == b'\n').count() + 1;
    if text.trim_start().starts_with('[') {
        let raws: Vec<&serde_json::value::RawValue> = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: not a valid JSON array: {e}",
                path.display(),
                e.line()
            )
        })?;
        raws.iter()
            .map(|raw| {
                let offset = raw.get().as_ptr() as usize - text.as_ptr() as usize;
                let v: Value = serde_json::from_str(raw.get())?;
                check_object(path, line_of(offset), v)
            })
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: Value = serde_json::from_str(l).map_err(|e| {
                    anyhow::anyhow!("{}:{}: not valid JSON: {e}", path.display(), i + 1)
                })?;
                check_object(path, i + 1, v)
            })
            .collect()
    }
}

fn check_object(path: &Path, line: usize, v: Value) -> Result<(usize, Value)> {
    if !v.is_object() {
        bail!(
            "{}:{line}: expected a JSON object, found {}",
            path.display(),
            kind_name(&v)
        );
    }
    Ok((line, v))
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_field<'a>(rec: &'a Value, field: &str, format: DataFormat) -> Result<&'a str> {
    match rec.get(field) {
        None => bail!(
            "field `{field}` is missing ({} records need {})",
            format.name(),
            format.required().join(", ")
        ),
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!(
            "field `{field}` must be a string, found {}",
            kind_name(other)
        ),
    }
}

/// The Stanford Alpaca prompt, with or without the input section.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

fn ids(v: Vec<u32>) -> Vec<i64> {
    v.into_iter().map(i64::from).collect()
}

/// Prompt and completion tokenized apart (the prompt with the tokenizer's
/// special tokens, the completion without, then EOS), so that the boundary
/// between them is exact.
fn prompt_completion(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
    eos: i64,
    train_on_prompt: bool,
) -> Result<Example> {
    let p = ids(tok.encode(prompt, true)?);
    let mut c = ids(tok.encode(completion, false)?);
    c.push(eos);
    let labels = p
        .iter()
        .map(|&t| if train_on_prompt { t } else { IGNORE })
        .chain(c.iter().copied())
        .collect();
    let mut input_ids = p;
    input_ids.extend(c);
    Ok(Example { input_ids, labels })
}

fn tokenize(
    rec: &Value,
    format: DataFormat,
    tok: &Tokenizer,
    eos: i64,
    train_on_prompt: bool,
) -> Result<Example> {
    match format {
        DataFormat::Alpaca => {
            let instruction = string_field(rec, "instruction", format)?;
            let output = string_field(rec, "output", format)?;
            let input = match rec.get("input") {
                None | Some(Value::Null) => "",
                Some(_) => string_field(rec, "input", format)?,
            };
            prompt_completion(
                tok,
                &alpaca_prompt(instruction, input),
                output,
                eos,
                train_on_prompt,
            )
        }
        DataFormat::PromptCompletion => {
            let prompt = string_field(rec, "prompt", format)?;
            let completion = string_field(rec, "completion", format)?;
            prompt_completion(tok, prompt, completion, eos, train_on_prompt)
        }
        DataFormat::Text => {
            let mut input_ids = ids(tok.encode(string_field(rec, "text", format)?, true)?);
            input_ids.push(eos);
            Ok(Example {
                labels: input_ids.clone(),
                input_ids,
            })
        }
        DataFormat::Messages => chat_example(rec, tok, eos, train_on_prompt),
    }
}

/// A chat rendered with the model's template; the loss covers the assistant
/// turns: for turn i, the text between the rendering of the turns before it
/// (with the generation prompt) and the rendering up to it.
fn chat_example(rec: &Value, tok: &Tokenizer, eos: i64, train_on_prompt: bool) -> Result<Example> {
    let messages: Vec<Message> = match rec.get("messages") {
        None => {
            bail!("field `messages` is missing (messages records need a list of {{role, content}})")
        }
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            anyhow::anyhow!("field `messages` must be a list of {{role, content}} strings: {e}")
        })?,
    };
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("field `messages` has no assistant turn to learn from");
    }
    let full = tok.apply_chat_template(&messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.apply_chat_template(&messages[..i], true)?;
        let upto = tok.apply_chat_template(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&upto) {
            bail!("the chat template does not render turns as prefixes of the whole conversation; cannot find the assistant turns");
        }
        spans.push((before.len(), upto.len()));
    }
    let (tokens, offsets) = tok.encode_with_offsets(&full, false)?;
    let mut input_ids = ids(tokens);
    let mut labels: Vec<i64> = input_ids
        .iter()
        .zip(&offsets)
        .map(|(&t, &(s, e))| {
            let inside = spans.iter().any(|&(a, b)| s >= a && e <= b && e > s);
            if inside || train_on_prompt {
                t
            } else {
                IGNORE
            }
        })
        .collect();
    if input_ids.last() != Some(&eos) {
        input_ids.push(eos);
        labels.push(eos);
    }
    Ok(Example { input_ids, labels })
}

/// A right-padded batch.
pub struct Batch {
    /// `[B, T]` token ids (padding with the pad id).
    pub input_ids: Tensor,
    /// `[B, T]` targets, [`IGNORE`] on padding and prompts.
    pub labels: Tensor,
    /// `[B, T]`, 1 on real tokens.
    pub attention_mask: Tensor,
    /// Real tokens in the batch.
    pub num_tokens: i64,
    /// Positions that take a loss (labels at 1..T that are not ignored).
    pub num_label_tokens: i64,
}

/// Pads examples on the right to the longest of them.
pub fn collate(examples: &[&Example], pad_id: i64) -> Batch {
    let t = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(1);
    let b = examples.len();
    let (mut ids, mut labels, mut mask) = (
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
    );
    let (mut num_tokens, mut num_label_tokens) = (0i64, 0i64);
    for e in examples {
        let n = e.input_ids.len();
        ids.extend(
            e.input_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, t - n)),
        );
        labels.extend(
            e.labels
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE, t - n)),
        );
        mask.extend(std::iter::repeat_n(1i64, n).chain(std::iter::repeat_n(0, t - n)));
        num_tokens += n as i64;
        num_label_tokens += e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count() as i64;
    }
    let shape = [b as i64, t as i64];
    Batch {
        input_ids: Tensor::from_slice(&ids).view(shape),
        labels: Tensor::from_slice(&labels).view(shape),
        attention_mask: Tensor::from_slice(&mask).view(shape),
        num_tokens,
        num_label_tokens,
    }
}

/// SplitMix64, so that data order depends on the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The batches of one epoch as lists of example indices: a shuffle seeded by
/// (seed, epoch); with `group_by_length`, mega-batches of 50 batches sorted by
/// length (as transformers' `LengthGroupedSampler`) so padding is small, then
/// the batch order shuffled. The last batch may be smaller.
pub fn batch_order(
    lengths: &[usize],
    batch_size: usize,
    group_by_length: bool,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = Rng(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut idx);
    if !group_by_length {
        return idx.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for mega in idx.chunks(batch_size * 50) {
        let mut mega = mega.to_vec();
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Splits off `n` examples, chosen by `seed`, as a held-out evaluation set.
pub fn split_holdout(mut ds: Dataset, n: usize, seed: u64) -> (Dataset, Dataset) {
    let mut idx: Vec<usize> = (0..ds.examples.len()).collect();
    Rng(seed ^ 0x5EED).shuffle(&mut idx);
    let held: std::collections::BTreeSet<usize> = idx.into_iter().take(n).collect();
    let all = std::mem::take(&mut ds.examples);
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, e) in all.into_iter().enumerate() {
        if held.contains(&i) {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    let eval_ds = Dataset {
        examples: eval,
        truncated: 0,
        dropped: 0,
        ..ds.clone()
    };
    ds.examples = train;
    (ds, eval_ds)
}

/// A prompt to generate from and the reference answer, for exact-match scoring.
pub struct GenerationCase {
    /// Prompt token ids, exactly as the model sees them in training.
    pub prompt_ids: Vec<u32>,
    /// The reference completion text.
    pub reference: String,
}

/// The prompts and reference answers of a data file: Alpaca and
/// prompt/completion records, or chats whose last message is the
/// assistant's answer (the turns before it are the prompt).
pub fn generation_cases(
    path: &Path,
    tok: &Tokenizer,
    format: Option<DataFormat>,
) -> Result<Vec<GenerationCase>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let records = parse_records(path, &text)?;
    let Some(first) = records.first() else {
        bail!("{}: no records (the dataset is empty)", path.display());
    };
    let format = match format {
        Some(f) => f,
        None => DataFormat::detect(&first.1)
            .with_context(|| format!("{}: cannot tell the format", path.display()))?,
    };
    records
        .iter()
        .map(|(_, rec)| {
            let case = match format {
                DataFormat::Alpaca => {
                    let input = rec.get("input").and_then(Value::as_str).unwrap_or("");
                    let prompt = alpaca_prompt(string_field(rec, "instruction", format)?, input);
                    GenerationCase {
                        prompt_ids: tok.encode(&prompt, true)?,
                        reference: string_field(rec, "output", format)?.to_owned(),
                    }
                }
                DataFormat::PromptCompletion => GenerationCase {
                    prompt_ids: tok.encode(string_field(rec, "prompt", format)?, true)?,
                    reference: string_field(rec, "completion", format)?.to_owned(),
                },
                DataFormat::Messages => {
                    let messages: Vec<Message> =
                        serde_json::from_value(rec.get("messages").cloned().unwrap_or_default())
                            .map_err(|e| anyhow::anyhow!("field `messages`: {e}"))?;
                    match messages.split_last() {
                        Some((last, before)) if last.role == "assistant" && !before.is_empty() => {
                            GenerationCase {
                                prompt_ids: tok.encode_chat(before, true)?,
                                reference: last.content.clone(),
                            }
                        }
                        _ => bail!("field `messages` must end with an assistant answer to score"),
                    }
                }
                DataFormat::Text => bail!("plain `text` records have no answer to score"),
            };
            Ok(case)
        })
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("{}:{}", path.display(), records[i].0)))
        .collect()
}
