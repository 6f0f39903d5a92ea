//! The record formats: reading a data file into records (a JSON array or
//! JSONL, bounded in size), telling their format, and reading their fields
//! with errors that name the file, the line and the field.

use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use crate::tokenizer::{Message, Tokenizer};

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

peft_adapters::value_enum_text!(DataFormat, "--format");

/// What each format needs, for error messages.
pub(crate) const SHAPES: &str =
    "Alpaca {instruction, input, output}, {messages: [{role, content}, ...]}, \
                      {prompt, completion} or {text}";

impl DataFormat {
    /// The name used on the command line (`--format`).
    pub fn name(&self) -> String {
        self.to_string()
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

/// `FILE:LINE: message` as one error, so that the location survives however
/// the error is printed (`{}` shows only the outermost context).
pub(crate) fn at(path: &Path, line: usize, e: impl fmt::Display) -> anyhow::Error {
    anyhow!("{}:{line}: {e:#}", path.display())
}

/// Reads a data file into (line number, record) pairs; an empty file is an error.
pub(crate) fn read_records(path: &Path) -> Result<Vec<(usize, Value)>> {
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

pub(crate) fn resolve_format(
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

pub(crate) fn check_record_size(path: &Path, line: usize, len: usize) -> Result<()> {
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
pub(crate) fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    s.strip_suffix(&suffix).map(str::to_owned).unwrap_or(s)
}

pub(crate) fn check_object(path: &Path, line: usize, v: Value) -> Result<(usize, Value)> {
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

pub(crate) fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn string_field<'a>(rec: &'a Value, field: &str, format: DataFormat) -> Result<&'a str> {
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
pub(crate) fn alpaca_parts(rec: &Value) -> Result<(String, &str)> {
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
pub(crate) fn chat_messages(rec: &Value) -> Result<Vec<Message>> {
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

pub(crate) fn generation_case(
    rec: &Value,
    format: DataFormat,
    tok: &Tokenizer,
) -> Result<GenerationCase> {
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
