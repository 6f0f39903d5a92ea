//! Training data on the tokenizers people fine-tune with: SentencePiece-style
//! tokenizers (Llama-2, Mistral, TinyLlama) against TRL-style joint
//! tokenization, and Llama-3 chats against transformers' assistant-token mask.
//! The references come from `tests/fixtures/tokenizer_reference.py`.

mod common;

use std::path::Path;

use peft_rs::data::{load_dataset, DataFormat, DataOptions, Dataset, IGNORE};
use peft_rs::models::Pretrained;
use peft_rs::tokenizer::Tokenizer;
use serde_json::Value;
use tch::{Device, Kind};

fn fx() -> &'static Path {
    let alpaca = common::shared("data/alpaca_5000.json");
    common::fixture(
        "tokenizer_reference.py",
        &[],
        &[&alpaca, &common::default_model()],
    )
}

fn expected(dir: &str) -> Value {
    common::read_json(&fx().join(dir).join("expected.json"))
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Writes the records as JSONL and loads them as `format`, with `tok`'s EOS.
fn load(tmp: &Path, tok: &Tokenizer, format: DataFormat, records: &[&Value]) -> Dataset {
    let path = tmp.join(format!("{}.jsonl", format.name()));
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    let opts = DataOptions {
        format: Some(format),
        max_seq_len: 100_000,
        train_on_prompt: false,
    };
    let eos = tok.eos_token_id().expect("the tokenizer has an eos_token") as i64;
    let ds = load_dataset(&path, tok, eos, &opts).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(ds.examples.len(), records.len(), "no record may be dropped");
    ds
}

#[test]
fn sentencepiece_tokenizers_match_trl_joint_tokenization() {
    for name in ["sp_metaspace", "sp_legacy"] {
        let tok = Tokenizer::from_model_dir(&fx().join(name)).unwrap();
        let exp = expected(name);
        let tmp = tempfile::tempdir().unwrap();
        let mut checked = 0;
        for (format, key) in [
            (DataFormat::Alpaca, "alpaca"),
            (DataFormat::PromptCompletion, "prompt_completion"),
        ] {
            let cases = exp[key].as_array().unwrap();
            let records: Vec<&Value> = cases.iter().map(|c| &c["record"]).collect();
            let ds = load(tmp.path(), &tok, format, &records);
            for (i, (ex, case)) in ds.examples.iter().zip(cases).enumerate() {
                assert_eq!(
                    ex.input_ids,
                    ids(&case["input_ids"]),
                    "{name} {key}[{i}]: input_ids differ from TRL's"
                );
                assert_eq!(
                    ex.labels,
                    ids(&case["labels"]),
                    "{name} {key}[{i}]: labels differ from TRL's"
                );
                checked += 1;
            }
        }
        // The trap: "Answer" tokenized alone starts a word ("▁A..."), which
        // the joined text after "\n" does not.
        let alone = ids(&exp["completion_alone"]);
        let joint = ids(&exp["prompt_completion"][2]["input_ids"]);
        assert!(
            !joint.windows(alone.len()).any(|w| w == alone.as_slice()),
            "{name}: the fixture must show the word-boundary difference"
        );
        eprintln!("{name}: {checked} examples equal TRL's input_ids and labels");
    }
}

#[test]
fn llama3_chats_learn_each_assistant_turn_through_eot_and_nothing_after() {
    let dir = fx().join("llama3");
    let exp = expected("llama3");
    let chats = exp["chats"].as_array().unwrap();
    let records: Vec<Value> = chats
        .iter()
        .map(|c| serde_json::json!({"messages": c["messages"]}))
        .collect();
    let refs: Vec<&Value> = records.iter().collect();
    let eot = exp["special"]["<|eot_id|>"].as_i64().unwrap();
    let end_of_text = exp["special"]["<|end_of_text|>"].as_i64().unwrap();

    // The real Llama-3 template (no generation marks), and the same template
    // with {% generation %} blocks, read by peft-rs itself.
    let marked = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), marked.path().join(f)).unwrap();
    }
    std::fs::copy(
        dir.join("marked_template.jinja"),
        marked.path().join("chat_template.jinja"),
    )
    .unwrap();
    for (what, tok_dir) in [
        ("template", dir.as_path()),
        ("marked template", marked.path()),
    ] {
        let tok = Tokenizer::from_model_dir(tok_dir).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let ds = load(tmp.path(), &tok, DataFormat::Messages, &refs);
        for (i, (ex, case)) in ds.examples.iter().zip(chats).enumerate() {
            let want_ids = ids(&case["input_ids"]);
            let mask = ids(&case["assistant_masks"]);
            let want_labels: Vec<i64> = want_ids
                .iter()
                .zip(&mask)
                .map(|(&t, &m)| if m == 1 { t } else { IGNORE })
                .collect();
            assert_eq!(ex.input_ids, want_ids, "{what}, chat {i}: input_ids");
            assert_eq!(
                ex.labels, want_labels,
                "{what}, chat {i}: labels must be transformers' assistant tokens"
            );
            assert_eq!(
                *ex.input_ids.last().unwrap(),
                eot,
                "chat {i} ends with <|eot_id|>"
            );
            assert!(
                !ex.input_ids.contains(&end_of_text),
                "chat {i}: no <|end_of_text|> is appended after the turn"
            );
            let turns = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["role"] == "assistant")
                .count();
            let labelled_eots = ex.labels.iter().filter(|&&l| l == eot).count();
            assert_eq!(
                labelled_eots, turns,
                "chat {i}: each assistant turn learns its <|eot_id|>"
            );
        }
    }

    // Completions of the other formats end with tokenizer.eos_token (<|eot_id|>),
    // while generation stops on every id of generation_config.eos_token_id.
    let base = Pretrained::load(&dir, Kind::Float, Device::Cpu).unwrap();
    assert_eq!(base.completion_eos().unwrap(), eot);
    assert_eq!(base.eos_token_ids, vec![end_of_text, eot]);
}
