//! Tokenization and chat templating agree with transformers' tokenizer
//! (ids with and without special tokens, decoding, rendered templates), on
//! texts with non-ASCII characters and special tokens.

mod common;

use peft_rs::tokenizer::{Message, Tokenizer};
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check(name: &str) {
    let tok = Tokenizer::from_model_dir(&common::model_dir(name)).unwrap();
    let r: Value = common::read_json(&common::reference().join(name).join("tokenize.json"));
    let texts = r["texts"].as_array().unwrap();
    assert!(texts.len() >= 8);
    for t in texts {
        let text = t["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&t["with_special"]),
            "{name}: {text:?} with special tokens"
        );
        let plain = tok.encode(text, false).unwrap();
        assert_eq!(plain, ids(&t["without_special"]), "{name}: {text:?}");
        assert_eq!(
            tok.decode(&plain, false).unwrap(),
            t["decoded"].as_str().unwrap(),
            "{name}: decode {text:?}"
        );
    }
    for c in r["chats"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let rendered = tok.apply_chat_template(&messages, gen).unwrap();
        assert_eq!(
            rendered,
            c["rendered"].as_str().unwrap(),
            "{name}: template of {messages:?}"
        );
        assert_eq!(
            tok.encode_chat(&messages, gen).unwrap(),
            ids(&c["ids"]),
            "{name}: chat ids"
        );
    }
}

#[test]
fn smollm2_tokenizer_and_chat_template_match_transformers() {
    check("smollm2");
}

#[test]
fn bos_adding_tokenizer_matches_transformers() {
    // The tiny llama's tokenizer adds a BOS like Llama's does.
    check("llama");
}

#[test]
fn python_style_chat_template_matches_transformers() {
    // The tiny qwen2's template uses .strip(), loop controls and raise_exception.
    check("qwen2");
}

#[test]
fn template_raise_exception_is_an_error() {
    let tok = Tokenizer::from_model_dir(&common::model_dir("qwen2")).unwrap();
    let bad = vec![Message {
        role: "robot".into(),
        content: "hi".into(),
    }];
    let err = tok.apply_chat_template(&bad, true).unwrap_err();
    assert!(format!("{err:#}").contains("unknown role robot"), "{err:#}");
}
