//! Instruction data: reading Alpaca, chat `messages`, `prompt`/`completion`
//! and plain `text` records, tokenizing them with the loss on completions
//! only, and batching with right padding.
//!
//! A malformed record is an error naming `file:line` and the field, raised
//! before any training starts: silently skipping records would train on a
//! different dataset than the user believes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Result};
use rayon::prelude::*;
use serde_json::Value;
use tch::Tensor;

use crate::tokenizer::{Message, Span, Tokenizer};
use peft_regularizers::rng::SplitMix64;

/// Label value that takes no loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// The record shapes peft-rs reads.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// `instruction`, optional `input`, `output`, with the Stanford Alpaca
    /// prompt template.
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

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What each format needs, for error messages.
const SHAPES: &str = "Alpaca {instruction, input, output}, {messages: [{role, content}, ...]}, \
                      {prompt, completion} or {text}";

impl DataFormat {
    /// The name used on the command line (`--format`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Alpaca => "alpaca",
            Self::Messages => "messages",
            Self::PromptCompletion => "prompt-completion",
            Self::Text => "text",
        }
    }

    /// The sentence that ends a missing- or wrong-field error.
    fn needs(&self) -> &'static str {
        match self {
            Self::Alpaca => {
                "Alpaca records need `instruction` and `output` strings, and optionally `input`"
            }
            Self::Messages => {
                "messages records need `messages`: a list of {\"role\": ..., \"content\": ...} strings"
            }
            Self::PromptCompletion => {
                "prompt-completion records need `prompt` and `completion` strings"
            }
            Self::Text => "text records need a `text` string",
        }
    }

    /// The format of a record from its keys. A record with only half of a
    /// shape (`instruction` without `output`) still picks that shape, so the
    /// error names the missing field instead of "unknown format".
    fn detect(record: &Value) -> Option<Self> {
        let has = |k: &str| record.get(k).is_some();
        if has("instruction") {
            Some(Self::Alpaca)
        } else if has("messages") {
            Some(Self::Messages)
        } else if has("prompt") && has("completion") {
            Some(Self::PromptCompletion)
        } else if has("text") {
            Some(Self::Text)
        } else if has("prompt") || has("completion") {
            Some(Self::PromptCompletion)
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
    /// Longer examples are truncated to their first `max_seq_len` tokens.
    pub max_seq_len: usize,
    /// Take the loss on prompt tokens (and non-assistant turns) too.
    pub train_on_prompt: bool,
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<i64>,
    /// The target at each position ([`IGNORE`] where no loss is taken), the
    /// same length as `input_ids`. Labels are not shifted: the model's
    /// prediction at position i is scored against `labels[i+1]`, so
    /// `labels[0]` never takes a loss.
    pub labels: Vec<i64>,
    /// For a row of packed examples, their lengths in order (empty: one example).
    pub segments: Vec<usize>,
}

impl Example {
    /// Positions that take a loss (`labels[1..]` that are not [`IGNORE`]).
    pub fn num_label_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// A tokenized data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its record format (given or detected).
    pub format: DataFormat,
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples left with no label token after truncation (not kept).
    pub dropped: usize,
}

impl Dataset {
    /// A digest of the tokenized examples (ids, labels, packing), with which
    /// ranks check that they read the same data: FNV-1a over every value.
    pub fn digest(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for e in &self.examples {
            eat(e.input_ids.len() as u64);
            e.input_ids.iter().for_each(|&t| eat(t as u64));
            e.labels.iter().for_each(|&t| eat(t as u64));
            e.segments.iter().for_each(|&t| eat(t as u64));
        }
        h
    }
}

/// `FILE:LINE: message` as one error, so that the location survives however
/// the error is printed (`{}` shows only the outermost context).
fn at(path: &Path, line: usize, e: impl fmt::Display) -> anyhow::Error {
    anyhow!("{}:{line}: {e:#}", path.display())
}

/// Reads and tokenizes a data file: a JSON array or JSONL (one object a
/// line). A malformed record stops everything with its file, line and field
/// named; examples keep the file order. `eos_token_id` ends completions and
/// texts (`tokenizer.eos_token`, see [`crate::models::Pretrained::completion_eos`]);
/// chats end with what their template writes.
pub fn load_dataset(
    path: &Path,
    tok: &Tokenizer,
    eos_token_id: i64,
    opts: &DataOptions,
) -> Result<Dataset> {
    let records = read_records(path)?;
    let format = resolve_format(path, &records, opts.format)?;
    let budget = text_budget(tok, opts.max_seq_len);
    // Tokenizing dominates loading; rayon keeps the output in file order.
    let tokenized: Vec<Result<Example>> = records
        .par_iter()
        .map(|(line, rec)| {
            tokenize(rec, format, tok, eos_token_id, opts, budget).map_err(|e| at(path, *line, e))
        })
        .collect();
    let mut examples = Vec::with_capacity(tokenized.len());
    let (mut truncated, mut dropped) = (0, 0);
    // The first bad record in file order is the one reported.
    for ex in tokenized {
        let mut ex = ex?;
        if ex.input_ids.len() > opts.max_seq_len {
            ex.input_ids.truncate(opts.max_seq_len);
            ex.labels.truncate(opts.max_seq_len);
            truncated += 1;
        }
        if ex.num_label_tokens() == 0 {
            dropped += 1;
            continue;
        }
        examples.push(ex);
    }
    if examples.is_empty() {
        bail!(
            "{}: no example has a token to learn from: all {} records were dropped because \
             nothing but prompt tokens fits in max_seq_len {}; raise --max-seq-len or shorten the prompts",
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

/// Reads a data file into (line number, record) pairs; an empty file is an error.
fn read_records(path: &Path) -> Result<Vec<(usize, Value)>> {
    // A data file may be large; it must still be a file.
    let text = peft_adapters::fsio::read_regular_string(path, u64::MAX / 2, "data file")?;
    let records = parse_records(path, &text)?;
    if records.is_empty() {
        bail!(
            "{}: the file is empty (no records); expected a JSON array of objects or JSONL with one object a line",
            path.display()
        );
    }
    Ok(records)
}

fn resolve_format(
    path: &Path,
    records: &[(usize, Value)],
    given: Option<DataFormat>,
) -> Result<DataFormat> {
    if let Some(f) = given {
        return Ok(f);
    }
    let (line, first) = &records[0];
    DataFormat::detect(first).ok_or_else(|| {
        let keys: Vec<&str> = first
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        at(
            path,
            *line,
            format!(
                "cannot tell the data format from the keys {{{}}}; expected {SHAPES} \
                 (rename the fields, or pass --format)",
                keys.join(", ")
            ),
        )
    })
}

/// The largest record read, in bytes of JSON.
pub const MAX_RECORD_BYTES: usize = 16 << 20;
/// The most turns a chat record may have.
pub const MAX_MESSAGES: usize = 1024;

/// Bytes of text that surely hold more than `max_seq_len` tokens: no token
/// covers more than twice its vocabulary string's length, and a margin keeps
/// the tokens before the cut exactly as the whole text would give them.
/// Text past it is cut before tokenizing, so that one huge record costs
/// memory and time in proportion to what is kept, not to its size.
fn text_budget(tok: &Tokenizer, max_seq_len: usize) -> usize {
    max_seq_len
        .saturating_mul(2 * tok.max_token_bytes())
        .saturating_add(64 << 10)
}

/// `text` cut to at most `budget` bytes, at a character boundary.
fn cut(text: &str, budget: usize) -> &str {
    if text.len() <= budget {
        return text;
    }
    let mut end = budget;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn check_record_size(path: &Path, line: usize, len: usize) -> Result<()> {
    if len > MAX_RECORD_BYTES {
        return Err(at(
            path,
            line,
            format!("the record is {len} bytes, more than the {MAX_RECORD_BYTES} a record may have; split or shorten it"),
        ));
    }
    Ok(())
}

/// (line number, record) pairs from a JSON array (first non-space character
/// `[`) or JSONL text (blank lines skipped). Every record must be an object.
pub fn parse_records(path: &Path, text: &str) -> Result<Vec<(usize, Value)>> {
    // Editors on Windows write a byte-order mark that JSON parsers reject.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('[') {
        let raws: Vec<&serde_json::value::RawValue> = serde_json::from_str(text).map_err(|e| {
            at(
                path,
                e.line(),
                format!(
                    "not a valid JSON array: {} (column {})",
                    json_message(&e),
                    e.column()
                ),
            )
        })?;
        // Offsets grow through the array, so counting newlines from the last
        // record keeps this linear in the file size.
        let (mut pos, mut line) = (0usize, 1usize);
        raws.iter()
            .map(|raw| {
                let offset = raw.get().as_ptr() as usize - text.as_ptr() as usize;
                line += text.as_bytes()[pos..offset]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count();
                pos = offset;
                check_record_size(path, line, raw.get().len())?;
                let v: Value = serde_json::from_str(raw.get()).map_err(|e| at(path, line, e))?;
                check_object(path, line, v)
            })
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                check_record_size(path, i + 1, l.len())?;
                let v: Value = serde_json::from_str(l).map_err(|e| {
                    at(
                        path,
                        i + 1,
                        format!(
                            "not valid JSON: {} (column {}); JSONL needs one complete object \
                             a line, or make the whole file a JSON array",
                            json_message(&e),
                            e.column()
                        ),
                    )
                })?;
                check_object(path, i + 1, v)
            })
            .collect()
    }
}

/// serde_json's message without its "at line L column C" suffix, which
/// counts within one JSONL line and would contradict the file line we report.
fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    s.strip_suffix(&suffix).map(str::to_owned).unwrap_or(s)
}

fn check_object(path: &Path, line: usize, v: Value) -> Result<(usize, Value)> {
    if !v.is_object() {
        return Err(at(
            path,
            line,
            format!(
                "expected a JSON object per record, found {}; expected {SHAPES}",
                kind_name(&v)
            ),
        ));
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
        None => bail!("field `{field}` is missing ({})", format.needs()),
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!(
            "field `{field}` must be a string, found {} ({})",
            kind_name(other),
            format.needs()
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

/// The prompt and the answer of an Alpaca record.
fn alpaca_parts(rec: &Value) -> Result<(String, &str)> {
    let format = DataFormat::Alpaca;
    let instruction = string_field(rec, "instruction", format)?;
    let output = string_field(rec, "output", format)?;
    // Many Alpaca exports write `null` for "no input".
    let input = match rec.get("input") {
        None | Some(Value::Null) => "",
        Some(_) => string_field(rec, "input", format)?,
    };
    Ok((alpaca_prompt(instruction, input), output))
}

/// The `messages` of a chat record, checked field by field so that the error
/// names the turn (serde's own message would not).
fn chat_messages(rec: &Value) -> Result<Vec<Message>> {
    let needs = DataFormat::Messages.needs();
    let list = match rec.get("messages") {
        None => bail!("field `messages` is missing ({needs})"),
        Some(Value::Array(a)) => a,
        Some(other) => bail!(
            "field `messages` must be a list, found {} ({needs})",
            kind_name(other)
        ),
    };
    if list.len() > MAX_MESSAGES {
        bail!(
            "field `messages` has {} turns, more than the {MAX_MESSAGES} a record may have; split the conversation",
            list.len()
        );
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            if !m.is_object() {
                bail!(
                    "field `messages[{i}]` must be an object, found {} ({needs})",
                    kind_name(m)
                );
            }
            let get = |key: &str| -> Result<String> {
                match m.get(key) {
                    None => bail!("field `messages[{i}].{key}` is missing ({needs})"),
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => bail!(
                        "field `messages[{i}].{key}` must be a string, found {} ({needs})",
                        kind_name(other)
                    ),
                }
            };
            Ok(Message {
                role: get("role")?,
                content: get("content")?,
            })
        })
        .collect()
}

fn ids(v: Vec<u32>) -> Vec<i64> {
    v.into_iter().map(i64::from).collect()
}

/// Prompt and completion tokenized together, as the model sees them, with
/// the loss on every token that covers a byte of the completion, then the
/// EOS. Tokenizing the two apart would be wrong for SentencePiece tokenizers
/// (Llama-2, Mistral, Gemma): the completion alone starts a new "word" and
/// gets a `▁` that the joined text does not have. This is what TRL does
/// (tokenize prompt + completion, mask the prompt's share).
fn prompt_completion(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
    eos: i64,
    train_on_prompt: bool,
    budget: usize,
) -> Result<Example> {
    let joined = format!("{prompt}{completion}");
    let text = cut(&joined, budget);
    let (tokens, offsets) = tok.encode_with_offsets(text, true)?;
    let mut input_ids = ids(tokens);
    let boundary = prompt.len();
    let mut labels: Vec<i64> = input_ids
        .iter()
        .zip(&offsets)
        .map(|(&t, &(_, end))| {
            if train_on_prompt || end > boundary {
                t
            } else {
                IGNORE
            }
        })
        .collect();
    // TRL appends `tokenizer.eos_token` unless the completion already ends with it.
    if input_ids.last() != Some(&eos) {
        input_ids.push(eos);
        labels.push(eos);
    }
    Ok(Example {
        input_ids,
        labels,
        segments: vec![],
    })
}

fn tokenize(
    rec: &Value,
    format: DataFormat,
    tok: &Tokenizer,
    eos: i64,
    opts: &DataOptions,
    budget: usize,
) -> Result<Example> {
    let train_on_prompt = opts.train_on_prompt;
    match format {
        DataFormat::Alpaca => {
            let (prompt, output) = alpaca_parts(rec)?;
            prompt_completion(tok, &prompt, output, eos, train_on_prompt, budget)
        }
        DataFormat::PromptCompletion => {
            let prompt = string_field(rec, "prompt", format)?;
            let completion = string_field(rec, "completion", format)?;
            prompt_completion(tok, prompt, completion, eos, train_on_prompt, budget)
        }
        DataFormat::Text => prompt_completion(
            tok,
            "",
            string_field(rec, "text", format)?,
            eos,
            true,
            budget,
        ),
        DataFormat::Messages => {
            let messages = chat_messages(rec)?;
            if !messages.iter().any(|m| m.role == "assistant") {
                bail!(
                    "field `messages` has no assistant turn to learn from (roles: {})",
                    messages
                        .iter()
                        .map(|m| m.role.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let messages = within_budget(messages, budget);
            if !messages.iter().any(|m| m.role == "assistant") {
                // Every answer lies past max_seq_len: dropped and counted.
                return Ok(Example::default());
            }
            chat_example(&messages, tok, eos, train_on_prompt, opts.max_seq_len)
        }
    }
}

/// The turns of a chat that can reach the model within `budget` bytes of
/// content: later turns would be truncated away, so they are not rendered
/// (rendering every prefix of a chat costs the square of its length).
fn within_budget(mut messages: Vec<Message>, budget: usize) -> Vec<Message> {
    let mut used = 0usize;
    for (i, m) in messages.iter_mut().enumerate() {
        if used + m.content.len() > budget {
            let keep = cut(&m.content, budget - used).len();
            m.content.truncate(keep);
            messages.truncate(i + 1);
            break;
        }
        used += m.content.len();
    }
    messages
}

/// A chat rendered with the model's template, the loss on the assistant
/// turns.
///
/// Where the template marks assistant text with `{% generation %}` blocks,
/// those blocks are the turns, exactly as transformers'
/// `return_assistant_tokens_mask` reads them. Otherwise assistant turn i is
/// the text between the rendering of the turns before it with the generation
/// prompt and the rendering up to it: what the model must write when it
/// generates that turn, whatever the template's markup. That text ends with
/// the template's end-of-turn token (`<|eot_id|>`, `<|im_end|>`,
/// `<end_of_turn>`, `</s>`) and possibly a separator after it; the turn is
/// learned through its last special token and not beyond, since generation
/// stops there.
fn chat_example(
    messages: &[Message],
    tok: &Tokenizer,
    eos: i64,
    train_on_prompt: bool,
    max_seq_len: usize,
) -> Result<Example> {
    let marked = tok.has_generation_blocks();
    let (full, marked_spans) = if marked {
        tok.apply_chat_template_with_generation_spans(messages)?
    } else {
        (tok.apply_chat_template(messages, false)?, vec![])
    };
    let (tokens, offsets) = tok.encode_with_offsets(&full, false)?;
    // Turns that start past the last token kept by truncation need not be
    // located (locating turn i renders the i turns before it).
    let kept_end = offsets
        .get(max_seq_len.min(offsets.len()).saturating_sub(1))
        .map_or(0, |o| o.1);
    let spans = if marked || train_on_prompt {
        // With the loss on every token there is nothing to locate, which also
        // lets templates that fail the prefix check below be used.
        marked_spans
    } else {
        assistant_spans(tok, messages, &full, kept_end)?
    };
    let mut input_ids = ids(tokens);
    let mut labels = vec![IGNORE; input_ids.len()];
    if train_on_prompt {
        labels.clone_from(&input_ids);
    }
    for &(a, b) in &spans {
        // A token takes a loss when it covers any byte of a turn, as
        // transformers' `return_assistant_tokens_mask` does: a generation
        // prompt ending in a space ("assistant: ") merges with the first word
        // of the answer into one token, which must not be lost.
        let first = offsets.partition_point(|o| o.1 <= a);
        let covering: Vec<usize> = (first..input_ids.len())
            .take_while(|&i| offsets[i].0 < b)
            .filter(|&i| offsets[i].1 > a)
            .collect();
        let last = match covering
            .iter()
            .rposition(|&i| tok.is_special(input_ids[i] as u32))
        {
            Some(k) if !marked => k,
            _ => covering.len().saturating_sub(1),
        };
        for &i in covering.iter().take(last + 1) {
            labels[i] = input_ids[i];
        }
    }
    // A template that writes no special token after the last turn gives the
    // model no way to stop: append the EOS, as for the other formats.
    let content_end = full.trim_end().len();
    let last_real = offsets.iter().rposition(|&(s, _)| s < content_end);
    let ends_special = last_real.is_some_and(|i| tok.is_special(input_ids[i] as u32));
    if !marked && !ends_special {
        input_ids.push(eos);
        labels.push(eos);
    }
    Ok(Example {
        input_ids,
        labels,
        segments: vec![],
    })
}

/// The byte spans of the assistant turns in `full` (the whole chat rendered)
/// that start before byte `until`, each from the end of the generation
/// prompt before it to the end of its rendering.
fn assistant_spans(
    tok: &Tokenizer,
    messages: &[Message],
    full: &str,
    until: usize,
) -> Result<Vec<Span>> {
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.apply_chat_template(&messages[..i], true)?;
        if before.len() >= until {
            break;
        }
        let upto = tok.apply_chat_template(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&upto) || before.len() > upto.len() {
            bail!(
                "the chat template does not render the turns before `messages[{i}]` as a prefix \
                 of the whole conversation, so the assistant turn cannot be located for masking; \
                 use --train-on-prompt, or the prompt-completion format with the prompt rendered beforehand"
            );
        }
        spans.push((before.len(), upto.len()));
    }
    Ok(spans)
}

/// A right-padded batch.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]` token ids (i64), padded with the pad id.
    pub input_ids: Tensor,
    /// `[B, T]` targets (i64), [`IGNORE`] on padding and masked prompts.
    pub labels: Tensor,
    /// `[B, T]` (i64), 1 on real tokens and 0 on padding.
    pub attention_mask: Tensor,
    /// Real (non-padding) tokens in the batch.
    pub num_tokens: i64,
    /// Positions that take a loss (labels at 1..T that are not ignored), the
    /// denominator of a token-mean loss across gradient-accumulation steps.
    pub num_label_tokens: i64,
    /// With packing, `[B, T]` positions restarting at 0 for each example.
    pub position_ids: Option<Tensor>,
    /// With packing, `[B, T]` segment ids (1, 2, ... per example; 0 on padding).
    pub segment_ids: Option<Tensor>,
}

impl Batch {
    /// How the decoder reads this batch (`ids` and `segments` on the model's device).
    pub fn decoder_input<'a>(
        &'a self,
        ids: &'a Tensor,
        segments: Option<&'a Tensor>,
    ) -> crate::models::DecoderInput<'a> {
        use crate::models::{AttentionLayout, DecoderInput};
        match segments {
            Some(segment_ids) => DecoderInput {
                input_ids: ids,
                position_ids: self.position_ids.as_ref(),
                layout: AttentionLayout::Packed { segment_ids },
            },
            None => DecoderInput::causal(ids),
        }
    }
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
    let packed = examples.iter().any(|e| !e.segments.is_empty());
    let (mut positions, mut segment_ids) = (Vec::new(), Vec::new());
    for e in examples {
        let n = e.input_ids.len();
        debug_assert_eq!(n, e.labels.len(), "input_ids and labels differ in length");
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
        num_label_tokens += e.num_label_tokens() as i64;
        if packed {
            let lengths = if e.segments.is_empty() {
                vec![n]
            } else {
                e.segments.clone()
            };
            for (s, &len) in lengths.iter().enumerate() {
                positions.extend(0..len as i64);
                segment_ids.extend(std::iter::repeat_n(s as i64 + 1, len));
            }
            positions.extend(std::iter::repeat_n(0, t - n));
            segment_ids.extend(std::iter::repeat_n(0, t - n));
        }
    }
    let shape = [b as i64, t as i64];
    let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape);
    Batch {
        input_ids: tensor(&ids),
        labels: tensor(&labels),
        attention_mask: tensor(&mask),
        num_tokens,
        num_label_tokens,
        position_ids: packed.then(|| tensor(&positions)),
        segment_ids: packed.then(|| tensor(&segment_ids)),
    }
}

/// Packs examples into rows of at most `max_len` tokens, best fit
/// decreasing (as TRL's `bfd` packing): longest first, each into the fullest
/// row it still fits. Each row keeps its examples' lengths, so that the
/// model restarts positions and confines attention to each example; the
/// first label of every packed example is masked, so that no example learns
/// to predict the next one's first token. The rows are in a fixed order; the
/// epochs shuffle them.
pub fn pack(examples: Vec<Example>, max_len: usize) -> Vec<Example> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len()));
    // Row lengths kept sorted, so the best fit is a binary search.
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut by_room: std::collections::BTreeMap<(usize, usize), ()> = Default::default();
    for i in order {
        let len = examples[i].input_ids.len();
        // The row with the least room that still fits `len`.
        let fit = by_room.range((len, 0)..).next().map(|(&k, _)| k);
        let row = match fit {
            Some((room, r)) => {
                by_room.remove(&(room, r));
                by_room.insert((room - len, r), ());
                r
            }
            None => {
                rows.push(Vec::new());
                by_room.insert((max_len.saturating_sub(len), rows.len() - 1), ());
                rows.len() - 1
            }
        };
        rows[row].push(i);
    }
    let mut examples: Vec<Option<Example>> = examples.into_iter().map(Some).collect();
    rows.into_iter()
        .map(|members| {
            let mut row = Example::default();
            for i in members {
                let e = examples[i].take().expect("each example is packed once");
                row.segments.push(e.input_ids.len());
                row.input_ids.extend(&e.input_ids);
                let mut labels = e.labels;
                labels[0] = IGNORE;
                row.labels.extend(labels);
            }
            row
        })
        .collect()
}

/// The batches of one epoch as lists of example indices, from a shuffle
/// seeded by (seed, epoch). With `group_by_length`, the shuffled indices are
/// cut into mega-batches of 50 batches, each sorted by length (longest
/// first) and cut into batches, as transformers' `LengthGroupedSampler`
/// does, so that a batch holds examples of similar length and little
/// padding; the batch order is then shuffled. The last batch may be smaller.
///
/// # Panics
/// If `batch_size` is 0.
pub fn batch_order(
    lengths: &[usize],
    batch_size: usize,
    group_by_length: bool,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch_order: batch_size must be at least 1");
    // SplitMix64, not libtorch: the order must depend on the seed alone,
    // the same across platforms and libtorch versions.
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut idx);
    if !group_by_length {
        return idx.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for mega in idx.chunks(batch_size * 50) {
        let mut mega = mega.to_vec();
        // Stable, so that equal lengths keep the shuffled order.
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Splits off `n` examples, chosen by `seed`, as a held-out evaluation set
/// (returned second); both keep the file order. The held-out set reports no
/// truncated or dropped examples: those counts belong to the file.
pub fn split_holdout(mut ds: Dataset, n: usize, seed: u64) -> (Dataset, Dataset) {
    let mut idx: Vec<usize> = (0..ds.examples.len()).collect();
    SplitMix64::new(seed ^ 0x5EED).shuffle(&mut idx);
    let mut held = vec![false; ds.examples.len()];
    for &i in idx.iter().take(n) {
        held[i] = true;
    }
    let all = std::mem::take(&mut ds.examples);
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (e, h) in all.into_iter().zip(held) {
        if h {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    let eval_ds = Dataset {
        path: ds.path.clone(),
        format: ds.format,
        examples: eval,
        truncated: 0,
        dropped: 0,
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
    let records = read_records(path)?;
    let format = resolve_format(path, &records, format)?;
    records
        .iter()
        .map(|(line, rec)| generation_case(rec, format, tok).map_err(|e| at(path, *line, e)))
        .collect()
}

fn generation_case(rec: &Value, format: DataFormat, tok: &Tokenizer) -> Result<GenerationCase> {
    Ok(match format {
        DataFormat::Alpaca => {
            let (prompt, output) = alpaca_parts(rec)?;
            GenerationCase {
                prompt_ids: tok.encode(&prompt, true)?,
                reference: output.to_owned(),
            }
        }
        DataFormat::PromptCompletion => GenerationCase {
            prompt_ids: tok.encode(string_field(rec, "prompt", format)?, true)?,
            reference: string_field(rec, "completion", format)?.to_owned(),
        },
        DataFormat::Messages => {
            let messages = chat_messages(rec)?;
            match messages.split_last() {
                Some((last, before)) if last.role == "assistant" && !before.is_empty() => {
                    GenerationCase {
                        prompt_ids: tok.encode_chat(before, true)?,
                        reference: last.content.clone(),
                    }
                }
                _ => bail!(
                    "field `messages` must end with an assistant answer to score, after at least one other turn"
                ),
            }
        }
        DataFormat::Text => bail!(
            "plain `text` records have no answer to score; use Alpaca, messages or prompt-completion data"
        ),
    })
}
