//! The tokenizer as llama.cpp reads it from GGUF metadata (`tokenizer.*`):
//! the token list with each token's type, the BPE merges, the special token
//! ids, whether a BOS is added, the pre-tokenizer by llama.cpp's name for it,
//! and the chat template. Read from the model directory's `tokenizer.json`
//! and `tokenizer_config.json`, so that llama.cpp splits text into the ids
//! the trained model saw.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::file::Value;
use crate::tokenizer::Tokenizer;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The split regexes of the byte-level BPE tokenizers llama.cpp knows, as
/// their `tokenizer.json` writes them, with llama.cpp's name.
const SPLIT_REGEXES: &[(&str, &str)] = &[
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "llama-bpe",
    ),
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "qwen2",
    ),
];

/// The `tokenizer.*` metadata of the model in `dir` for llama.cpp's
/// architecture `arch`, for a vocabulary of `vocab_size` ids (the
/// embedding's rows: ids past the tokenizer's are padding tokens, as
/// llama.cpp's converter names them). A SentencePiece model
/// (`tokenizer.model`) is written as such where the converter does so
/// (Llama 2 and Mistral v0.1 style `llama`, Phi-3-mini, Gemma 3).
pub fn metadata(dir: &Path, vocab_size: usize, arch: &str) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let text = peft_adapters::fsio::read_regular_string(
        &path,
        peft_adapters::fsio::MAX_TOKENIZER_BYTES,
        "tokenizer",
    )?;
    let json: Json = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let tokenizer_config = read_tokenizer_config(dir)?;
    let mut kv = Vec::new();
    // llama.cpp's converter takes this from tokenizer_config.json for llama.
    if let (Some(prefix), "llama") = (tokenizer_config["add_prefix_space"].as_bool(), arch) {
        kv.push((
            "tokenizer.ggml.add_space_prefix".to_owned(),
            Value::Bool(prefix),
        ));
    }
    let gpt2_class = tokenizer_config["tokenizer_class"] == "GPT2Tokenizer";
    let sentencepiece = dir.join("tokenizer.model").is_file()
        && matches!(arch, "llama" | "gemma3" | "phi3")
        && !(arch == "phi3" && gpt2_class);
    if sentencepiece {
        let (tokens, scores, types) = super::sentencepiece::vocab(dir, vocab_size)?;
        kv.extend([
            (
                "tokenizer.ggml.model".to_owned(),
                Value::Str("llama".into()),
            ),
            (
                "tokenizer.ggml.pre".to_owned(),
                Value::Str("default".into()),
            ),
            ("tokenizer.ggml.tokens".to_owned(), Value::Strs(tokens)),
            ("tokenizer.ggml.scores".to_owned(), Value::F32s(scores)),
            ("tokenizer.ggml.token_type".to_owned(), Value::I32s(types)),
        ]);
        if arch == "gemma3" {
            kv.push((
                "tokenizer.ggml.add_space_prefix".to_owned(),
                Value::Bool(false),
            ));
        }
    } else {
        kv.extend(byte_level_bpe(&json, vocab_size, &path)?);
    }
    kv.extend(special_tokens(dir)?);
    Ok(kv)
}

/// `tokenizer_config.json` (an empty object when there is none).
fn read_tokenizer_config(dir: &Path) -> Result<Json> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(Json::Object(Default::default()));
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// A byte-level BPE vocabulary: tokens, types, merges and the
/// pre-tokenizer by llama.cpp's name.
fn byte_level_bpe(json: &Json, vocab_size: usize, path: &Path) -> Result<Vec<(String, Value)>> {
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") || !is_byte_level(&json["pre_tokenizer"]) {
        bail!(
            "{}: a {} tokenizer without a SentencePiece tokenizer.model beside it; export gguf writes byte-level BPE \
             tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style) and SentencePiece models — \
             convert this model with llama.cpp's convert_hf_to_gguf.py after `peft-rs merge`",
            path.display(),
            model["type"].as_str().unwrap_or("non-BPE")
        );
    }
    let pre = pre_tokenizer_name(&json["pre_tokenizer"]).with_context(|| {
        format!(
            "{}: pre_tokenizer {} is not one llama.cpp knows by name (llama-bpe, qwen2, smollm, gpt-2); \
             llama.cpp would split text differently from the trained model",
            path.display(),
            json["pre_tokenizer"]
        )
    })?;
    let (tokens, types) = tokens_and_types(json, vocab_size, path)?;
    let merges = merges(model, path)?;
    Ok(vec![
        ("tokenizer.ggml.model".to_owned(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_owned(), Value::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_owned(), Value::Strs(tokens)),
        ("tokenizer.ggml.token_type".to_owned(), Value::I32s(types)),
        ("tokenizer.ggml.merges".to_owned(), Value::Strs(merges)),
    ])
}

/// The special token ids, whether a BOS and an EOS are added, and the chat
/// template.
fn special_tokens(dir: &Path) -> Result<Vec<(String, Value)>> {
    let tokenizer = Tokenizer::from_model_dir(dir)?;
    let mut kv = Vec::new();
    let (adds_bos, adds_eos) = added_specials(&tokenizer)?;
    let config_ids = config_token_ids(dir)?;
    for (key, gguf) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
        ("mask_token", "mask_token_id"),
    ] {
        // The BOS the tokenizer's post-processor adds is the one llama.cpp must add.
        let id = match (key, adds_bos) {
            ("bos_token", Some(id)) => Some(id),
            _ => tokenizer
                .special_token(key)
                .and_then(|t| tokenizer.token_to_id(t))
                .or_else(|| config_ids.get(key).copied()),
        };
        if let Some(id) = id {
            kv.push((format!("tokenizer.ggml.{gguf}"), Value::U32(id)));
        }
    }
    kv.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(adds_bos.is_some()),
    ));
    kv.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(adds_eos)));
    if let Some(t) = tokenizer.chat_template() {
        kv.push(("tokenizer.chat_template".into(), Value::Str(t.to_owned())));
    }
    Ok(kv)
}

fn is_byte_level(pre: &Json) -> bool {
    match pre["type"].as_str() {
        Some("ByteLevel") => true,
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .is_some_and(|v| v.iter().any(|p| p["type"] == "ByteLevel")),
        _ => false,
    }
}

/// llama.cpp's name for the way `pre` splits text before BPE.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let byte_level_regex =
        |p: &Json| p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true);
    if byte_level_regex(pre) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array()?;
    match parts.as_slice() {
        [digits, bl]
            if digits["type"] == "Digits"
                && digits["individual_digits"] == true
                && byte_level_regex(bl) =>
        {
            Some("smollm")
        }
        [split, bl]
            if split["type"] == "Split"
                && bl["type"] == "ByteLevel"
                && bl["use_regex"] == false =>
        {
            let regex = split["pattern"]["Regex"].as_str()?;
            SPLIT_REGEXES
                .iter()
                .find(|(r, _)| *r == regex)
                .map(|(_, n)| *n)
        }
        _ => None,
    }
}

/// Every id's token and type: added tokens are control tokens when
/// special, user-defined otherwise; ids nobody uses are `[PADn]`.
fn tokens_and_types(
    json: &Json,
    vocab_size: usize,
    path: &Path,
) -> Result<(Vec<String>, Vec<i32>)> {
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
    let mut place = |id: u64, token: &str, ty: i32| -> Result<()> {
        let Some(slot) = tokens.get_mut(id as usize) else {
            bail!(
                "{}: token {token:?} has id {id}, beyond the model's vocab_size {vocab_size}",
                path.display()
            );
        };
        *slot = Some(token.to_owned());
        types[id as usize] = ty;
        Ok(())
    };
    let vocab = json["model"]["vocab"]
        .as_object()
        .with_context(|| format!("{}: model.vocab missing", path.display()))?;
    for (token, id) in vocab {
        place(id.as_u64().context("vocab id")?, token, NORMAL)?;
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let ty = if t["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(
            t["id"].as_u64().context("added token id")?,
            t["content"].as_str().context("added token content")?,
            ty,
        )?;
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            })
        })
        .collect();
    Ok((tokens, types))
}

/// The merges as `"left right"` strings; a space inside a part of the
/// newer list format is written as `Ġ` (U+0120), byte-level BPE's space.
fn merges(model: &Json, path: &Path) -> Result<Vec<String>> {
    let list = model["merges"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                let part = |v: &Json| v.as_str().map(|s| s.replace(' ', "\u{120}"));
                match (part(&pair[0]), part(&pair[1])) {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => bail!("{}: a merge is not a pair of strings", path.display()),
                }
            }
            _ => bail!("{}: a merge is not a string or a pair", path.display()),
        })
        .collect()
}

/// The special tokens the tokenizer adds around a text: the id it puts in
/// front (the BOS llama.cpp must add), and whether it appends one.
fn added_specials(tokenizer: &Tokenizer) -> Result<(Option<u32>, bool)> {
    let plain = tokenizer.encode("a", false)?;
    let with = tokenizer.encode("a", true)?;
    let front = (with.len() > plain.len() && with.ends_with(&plain)
        || with.len() > plain.len() + 1)
        .then(|| with[0]);
    let back = with.len() > plain.len() && !with.ends_with(&plain);
    Ok((front, back))
}

/// `bos_token_id`, `eos_token_id`, `pad_token_id` of config.json (the first
/// of a list), for tokenizers whose config does not name them.
fn config_token_ids(dir: &Path) -> Result<HashMap<&'static str, u32>> {
    let raw = crate::config_json::RawConfig::read(dir)?;
    let mut ids = HashMap::new();
    for (key, field) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "pad_token_id"),
    ] {
        let id = match raw.json.get(field) {
            Some(Json::Number(n)) => n.as_u64(),
            Some(Json::Array(v)) => v.first().and_then(Json::as_u64),
            _ => None,
        };
        if let Some(id) = id {
            ids.insert(key, id as u32);
        }
    }
    Ok(ids)
}
