//! A SentencePiece vocabulary (`tokenizer.model`: Llama 2, Mistral v0.1,
//! Phi-3-mini, Gemma) as llama.cpp's `llama` tokenizer reads it: every
//! piece with its score and type, as llama.cpp's converter lists them.
//!
//! `tokenizer.model` is a protobuf `ModelProto` whose field 1 repeats the
//! pieces (`SentencePiece`: 1 piece, 2 score, 3 type). Only those are read;
//! the rest of the file (trainer and normalizer settings) is skipped.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

/// llama.cpp's (and SentencePiece's) piece types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// One piece of the model: its text, score and SentencePiece type.
#[derive(Debug, PartialEq)]
pub(super) struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: i32,
}

/// A cursor over protobuf bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.at)?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    /// The next field as (number, wire type, its bytes: a varint's value
    /// is returned in `varint`).
    fn field(&mut self) -> Option<(u64, u64, &'a [u8], u64)> {
        let key = self.varint()?;
        let (number, wire) = (key >> 3, key & 7);
        Some(match wire {
            0 => (number, wire, &[][..], self.varint()?),
            1 => (number, wire, self.take(8)?, 0),
            2 => {
                let n = usize::try_from(self.varint()?).ok()?;
                (number, wire, self.take(n)?, 0)
            }
            5 => (number, wire, self.take(4)?, 0),
            _ => return None,
        })
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

/// The pieces of the SentencePiece model in `bytes`, in id order.
pub(super) fn parse(bytes: &[u8]) -> Option<Vec<Piece>> {
    let mut model = Reader { bytes, at: 0 };
    let mut pieces = Vec::new();
    while !model.done() {
        let (number, wire, data, _) = model.field()?;
        if number != 1 || wire != 2 {
            continue;
        }
        let mut r = Reader { bytes: data, at: 0 };
        let mut piece = Piece {
            text: String::new(),
            score: 0.0,
            kind: NORMAL,
        };
        while !r.done() {
            match r.field()? {
                (1, 2, text, _) => piece.text = String::from_utf8(text.to_vec()).ok()?,
                (2, 5, score, _) => piece.score = f32::from_le_bytes(score.try_into().ok()?),
                (3, 0, _, kind) => piece.kind = kind as i32,
                _ => {}
            }
        }
        pieces.push(piece);
    }
    Some(pieces)
}

/// What llama.cpp's converter takes for special: added tokens some models
/// do not mark so (Gemma's `<unused…>`, `<|…|>` tokens).
fn looks_special(t: &str) -> bool {
    ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Tokens, scores and types for `vocab_size` ids from `dir`'s
/// `tokenizer.model`, then its added tokens (`added_tokens.json`,
/// `tokenizer_config.json`'s `added_tokens_decoder`), as llama.cpp's
/// converter lists them: ids past the model's are `[PADn]`.
pub(super) fn vocab(dir: &Path, vocab_size: usize) -> Result<(Vec<String>, Vec<f32>, Vec<i32>)> {
    let path = dir.join("tokenizer.model");
    let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let Some(pieces) = parse(&bytes) else {
        bail!(
            "{}: not a SentencePiece model (its protobuf does not parse)",
            path.display()
        );
    };
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    for (id, p) in pieces.iter().enumerate().take(vocab_size) {
        tokens[id] = p.text.clone();
        scores[id] = p.score;
        // The converter asks SentencePiece for these four; the rest
        // (user-defined pieces too) are normal.
        types[id] = match p.kind {
            k @ (UNKNOWN | CONTROL | UNUSED | BYTE) => k,
            _ => NORMAL,
        };
    }
    let mut added = |id: usize, token: String, kind: i32| {
        if id < vocab_size {
            tokens[id] = token;
            scores[id] = -1000.0;
            types[id] = kind;
        }
    };
    let added_file = dir.join("added_tokens.json");
    if added_file.is_file() {
        let json: Json = serde_json::from_str(&std::fs::read_to_string(&added_file)?)
            .with_context(|| format!("{}: not valid JSON", added_file.display()))?;
        for (token, id) in json.as_object().into_iter().flatten() {
            if let Some(id) = id.as_u64() {
                added(id as usize, token.clone(), USER_DEFINED);
            }
        }
    }
    let config_file = dir.join("tokenizer_config.json");
    if config_file.is_file() {
        let json: Json = serde_json::from_str(&std::fs::read_to_string(&config_file)?)
            .with_context(|| format!("{}: not valid JSON", config_file.display()))?;
        for (id, t) in json["added_tokens_decoder"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let (Ok(id), Some(content)) = (id.parse::<usize>(), t["content"].as_str()) else {
                continue;
            };
            if t["special"] == true || looks_special(content) {
                added(id, content.to_owned(), CONTROL);
            } else {
                // User-defined spaces pre-normalized, as the converter does.
                added(id, content.replace('\u{2581}', " "), USER_DEFINED);
            }
        }
    }
    Ok((tokens, scores, types))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf field key.
    fn key(number: u8, wire: u8) -> u8 {
        (number << 3) | wire
    }

    fn piece(text: &str, score: f32, kind: Option<u8>) -> Vec<u8> {
        let mut p = vec![key(1, 2), text.len() as u8];
        p.extend_from_slice(text.as_bytes());
        p.push(key(2, 5));
        p.extend_from_slice(&score.to_le_bytes());
        if let Some(k) = kind {
            p.extend_from_slice(&[key(3, 0), k]);
        }
        let mut field = vec![key(1, 2), p.len() as u8];
        field.extend(p);
        field
    }

    #[test]
    fn pieces_parse_with_scores_types_and_unknown_fields_skipped() {
        let mut bytes = piece("<unk>", 0.0, Some(2));
        bytes.extend(piece("\u{2581}the", -3.5, None));
        // A trainer_spec (field 2) and a varint field 7, to be skipped.
        bytes.extend_from_slice(&[key(2, 2), 2, key(1, 0), 9, key(7, 0), 1]);
        bytes.extend(piece("<0x0A>", 0.0, Some(6)));
        let pieces = parse(&bytes).unwrap();
        let kinds: Vec<(&str, f32, i32)> = pieces
            .iter()
            .map(|p| (p.text.as_str(), p.score, p.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("<unk>", 0.0, UNKNOWN),
                ("\u{2581}the", -3.5, NORMAL),
                ("<0x0A>", 0.0, BYTE)
            ]
        );
        // A truncated file does not parse.
        assert!(parse(&bytes[..bytes.len() - 1]).is_none());
    }
}
