//! `tokenizer.json` through the `tokenizers` crate, and chat templates
//! rendered the way transformers' `apply_chat_template` renders them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JinjaValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_adapters::fsio::{self, read_regular, read_regular_string};

/// A byte range `start..end` of a text.
pub type Span = (usize, usize);

/// One chat turn, as in transformers' `messages` lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<String>,
    special_tokens: serde_json::Map<String, Value>,
    max_token_bytes: std::sync::OnceLock<usize>,
}

impl Tokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and, where present,
    /// `chat_template.jinja` (or `chat_template.json`) from a model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() && !path.is_symlink() {
            bail!(
                "{}: not found (peft-rs needs the fast-tokenizer file tokenizer.json; \
                 save it with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)",
                path.display()
            );
        }
        let bytes = read_regular(&path, fsio::MAX_TOKENIZER_BYTES, "tokenizer")?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            anyhow::anyhow!("{}: cannot be read as a tokenizer: {e}", path.display())
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Map<String, Value> = if config_path.exists() {
            let text = read_regular_string(&config_path, fsio::MAX_JSON_BYTES, "tokenizer config")?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a valid JSON object", config_path.display()))?
        } else {
            Default::default()
        };
        let chat_template = read_chat_template(dir, &config)?;
        let mut special_tokens = serde_json::Map::new();
        for key in [
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
            "mask_token",
        ] {
            let token = match config.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                // Older files store `AddedToken` objects.
                Some(Value::Object(o)) => {
                    o.get("content").and_then(Value::as_str).map(str::to_owned)
                }
                _ => None,
            };
            if let Some(t) = token {
                special_tokens.insert(key.into(), Value::String(t));
            }
        }
        Ok(Self {
            inner,
            path,
            chat_template,
            special_tokens,
            max_token_bytes: std::sync::OnceLock::new(),
        })
    }

    /// Where `tokenizer.json` was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Checks that every id the tokenizer can produce has an embedding row.
    pub fn check_fits(&self, model_vocab_size: usize, config_path: &Path) -> Result<()> {
        // The largest id, not the count: added tokens may leave holes.
        let max_id = self
            .inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0) as usize;
        if max_id >= model_vocab_size {
            bail!(
                "{}: produces token id {max_id}, but {} says vocab_size = {model_vocab_size}; \
                 the tokenizer belongs to another model",
                self.path.display(),
                config_path.display()
            );
        }
        Ok(())
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's
    /// post-processor adds (a BOS for Llama tokenizers), as transformers does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("{}: cannot encode text: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with the byte span of each token in `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<Span>)> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("{}: cannot encode text: {e}", self.path.display()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow::anyhow!("{}: cannot decode: {e}", self.path.display()))
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The length in bytes of the longest vocabulary entry (added tokens
    /// included): an upper bound on the text one token stands for, up to
    /// what normalization changes.
    pub fn max_token_bytes(&self) -> usize {
        *self.max_token_bytes.get_or_init(|| {
            self.inner
                .get_vocab(true)
                .keys()
                .map(String::len)
                .max()
                .unwrap_or(1)
                .max(1)
        })
    }

    /// Whether `id` is a special added token (`<|eot_id|>`, `<|im_end|>`,
    /// `</s>`, ...), as the tokenizer's `added_tokens` mark it.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The id of `eos_token` from `tokenizer_config.json`.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_tokens
            .get("eos_token")
            .and_then(Value::as_str)
            .and_then(|t| self.token_to_id(t))
    }

    /// The id of `pad_token` from `tokenizer_config.json`.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special_tokens
            .get("pad_token")
            .and_then(Value::as_str)
            .and_then(|t| self.token_to_id(t))
    }

    /// The content of `key` (`bos_token`, `eos_token`, `unk_token`,
    /// `pad_token`) in `tokenizer_config.json`.
    pub fn special_token(&self, key: &str) -> Option<&str> {
        self.special_tokens.get(key).and_then(Value::as_str)
    }

    /// The chat template's source, if the model directory has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Whether the model directory has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Whether the chat template marks assistant text with
    /// `{% generation %}...{% endgeneration %}` (what transformers'
    /// `return_assistant_tokens_mask` reads).
    pub fn has_generation_blocks(&self) -> bool {
        self.chat_template
            .as_deref()
            .is_some_and(|t| generation_tag().is_match(t))
    }

    /// Renders `messages` (no generation prompt) and returns the text with the
    /// byte spans of its `{% generation %}` blocks, as transformers'
    /// `apply_chat_template(..., return_assistant_tokens_mask=True)` locates them.
    pub fn apply_chat_template_with_generation_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<Span>)> {
        let marked = self.render(messages, false)?;
        Ok(split_generation_marks(&marked))
    }

    /// Renders `messages` with the chat template, as
    /// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let text = self.render(messages, add_generation_prompt)?;
        if text.contains([GENERATION_START, GENERATION_END]) {
            return Ok(split_generation_marks(&text).0);
        }
        Ok(text)
    }

    /// The template's output, with generation blocks marked.
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let Some(template) = &self.chat_template else {
            bail!(
                "{}: the model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja); \
                 use --prompt for plain text",
                self.path.parent().unwrap_or(Path::new(".")).display()
            );
        };
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            &self.special_tokens,
        )
        .with_context(|| format!("{}: chat template", self.path.display()))
    }

    /// Token ids of a chat, as `apply_chat_template(..., tokenize=True)`: the
    /// rendered text is encoded without adding special tokens again.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

fn read_chat_template(
    dir: &Path,
    config: &serde_json::Map<String, Value>,
) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return read_regular_string(&jinja, fsio::MAX_JSON_BYTES, "chat template").map(Some);
    }
    let json = dir.join("chat_template.json");
    if json.exists() {
        let text = read_regular_string(&json, fsio::MAX_JSON_BYTES, "chat template")?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", json.display()))?;
        return Ok(v
            .get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned));
    }
    Ok(match config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        // A list of named templates: transformers uses the one named `default`.
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    })
}

/// Marks written where a `{% generation %}` block starts and ends (Unicode
/// private-use characters, which no chat content is expected to hold).
const GENERATION_START: char = '\u{E000}';
const GENERATION_END: char = '\u{E001}';

fn generation_tag() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("a valid regex")
    })
}

/// `{% generation %}` is a transformers extension of Jinja; minijinja does
/// not know it, so each tag becomes an expression writing a mark, keeping the
/// tag's whitespace control.
fn mark_generation_blocks(template: &str) -> std::borrow::Cow<'_, str> {
    generation_tag().replace_all(template, |c: &regex::Captures| {
        let mark = if c.get(2).is_some() {
            GENERATION_END
        } else {
            GENERATION_START
        };
        format!("{{{{{} '{mark}' {}}}}}", &c[1], &c[3])
    })
}

/// Removes the generation marks and returns the spans they enclosed.
fn split_generation_marks(marked: &str) -> (String, Vec<Span>) {
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut open = None;
    for ch in marked.chars() {
        match ch {
            GENERATION_START => open = Some(text.len()),
            GENERATION_END => {
                if let Some(start) = open.take() {
                    spans.push((start, text.len()));
                }
            }
            c => text.push(c),
        }
    }
    (text, spans)
}

/// Renders a chat template with the settings transformers uses: `trim_blocks`,
/// `lstrip_blocks`, loop controls, Python string methods, `raise_exception`,
/// `strftime_now`, and a `tojson` that writes like Python's `json.dumps`.
/// `{% generation %}` blocks are kept as marks (see [`split_generation_marks`]).
fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    special_tokens: &serde_json::Map<String, Value>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<JinjaValue, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        chrono::Local::now().format(&fmt).to_string()
    });
    env.add_filter("tojson", python_tojson);
    let template = mark_generation_blocks(template);
    env.add_template("chat", &template)
        .map_err(|e| anyhow::anyhow!("does not parse: {e}"))?;
    let mut ctx = special_tokens.clone();
    ctx.insert("messages".into(), serde_json::to_value(messages)?);
    ctx.insert(
        "add_generation_prompt".into(),
        Value::Bool(add_generation_prompt),
    );
    let tmpl = env.get_template("chat")?;
    let mut out = LimitedWriter(Vec::new());
    tmpl.render_captured_to(JinjaValue::from_serialize(&ctx), &mut out)
        .map_err(|e| match e.kind() {
            ErrorKind::OutOfFuel => anyhow::anyhow!(
                "cannot render: the template ran more than {TEMPLATE_FUEL} steps (a template loop that does not end?)"
            ),
            _ => anyhow::anyhow!("cannot render: {e}"),
        })?;
    String::from_utf8(out.0).map_err(|e| anyhow::anyhow!("cannot render: not UTF-8 ({e})"))
}

/// Instructions a chat template may run for one rendering: real templates
/// need a few hundred per turn.
pub const TEMPLATE_FUEL: u64 = 50_000_000;
/// The longest text a chat template may render.
pub const TEMPLATE_OUTPUT_LIMIT: usize = 256 << 20;

/// A writer that refuses to grow past [`TEMPLATE_OUTPUT_LIMIT`].
struct LimitedWriter(Vec<u8>);

impl std::io::Write for LimitedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > TEMPLATE_OUTPUT_LIMIT {
            return Err(std::io::Error::other(format!(
                "the template writes more than {TEMPLATE_OUTPUT_LIMIT} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `json.dumps(x, ensure_ascii=False, indent=indent)`, as transformers'
/// template filter writes it (minijinja's own escapes HTML characters).
fn python_tojson(
    value: JinjaValue,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let json: Value = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let out = match indent {
        None => python_compact(&json),
        Some(n) => {
            let indent = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            let mut buf = Vec::new();
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            json.serialize(&mut ser)
                .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8(buf).unwrap_or_default()
        }
    };
    kwargs.assert_all_used()?;
    Ok(out)
}

/// Python's default separators: `", "` and `": "`.
fn python_compact(v: &Value) -> String {
    match v {
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(python_compact).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), python_compact(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}
