//! Parity with Python transformers: fp32 logits on a right-padded batch and
//! greedy generation, for tiny random Llama / Mistral / Qwen2 models and the
//! default SmolLM2-135M-Instruct. Reference values come from
//! `tests/fixtures/reference.py`, run at test time.

mod common;

use common::{load, read_json, reference};
use tch::Kind;

fn logits_parity(name: &str) {
    let r = common::tensors(&reference().join(name).join("logits.safetensors"));
    let model = load(&common::model_dir(name));
    let ids = &r["input_ids"];
    let mask = r["attention_mask"].to_kind(Kind::Bool).unsqueeze(-1);
    let ours = tch::no_grad(|| model.forward(ids));
    let expected = &r["logits"];
    assert_eq!(ours.size(), expected.size());
    // Pad positions are not compared: transformers masks pad keys there, and
    // nothing downstream (loss, generation) reads them.
    let diff = (ours - expected)
        .abs()
        .masked_fill(&mask.logical_not(), 0.0);
    let max = diff.max().double_value(&[]);
    let lengths: Vec<i64> =
        Vec::try_from(r["attention_mask"].sum_dim_intlist(1, false, Kind::Int64)).unwrap();
    assert!(
        lengths.iter().any(|&l| l != lengths[0]),
        "the batch must be padded"
    );
    eprintln!("{name}: max |logits - transformers| = {max:.3e} over lengths {lengths:?}");
    assert!(max < 1e-4, "{name}: max abs diff {max}");
}

fn generate_ids(name: &str, batch_size: &str) -> Vec<serde_json::Value> {
    let prompts = reference().join(name).join("prompts.jsonl");
    common::generate_json(&common::model_dir(name), &prompts, batch_size)
}

/// Greedy generation one prompt at a time and all prompts in one
/// left-padded batch: both equal transformers' one-at-a-time `generate`, and
/// the batch equals transformers' batched `generate`.
fn generation_parity(name: &str) {
    let reference = reference().join(name);
    let read = |f: &str| -> Vec<serde_json::Value> { read_json(&reference.join(f)) };
    let expected = read("generate.json");
    let batched_reference = read("generate_batched.json");
    assert!(expected.len() >= 5);
    for batch_size in ["1", "16"] {
        let lines = generate_ids(name, batch_size);
        assert_eq!(lines.len(), expected.len());
        for (i, (ours, theirs)) in lines.iter().zip(&expected).enumerate() {
            assert_eq!(
                ours["prompt_token_ids"], theirs["prompt_token_ids"],
                "{name} prompt {i}: prompt ids"
            );
            assert_eq!(
                ours["token_ids"], theirs["token_ids"],
                "{name} prompt {i}, batches of {batch_size}: generated ids"
            );
            if batch_size == "16" {
                assert_eq!(
                    ours["token_ids"], batched_reference[i],
                    "{name} prompt {i}: transformers' batched generate"
                );
            }
        }
    }
}

#[test]
fn llama_logits_match_transformers() {
    logits_parity("llama");
}

#[test]
fn mistral_sliding_window_sharded_bf16_logits_match_transformers() {
    logits_parity("mistral");
}

#[test]
fn qwen2_fp16_logits_match_transformers() {
    logits_parity("qwen2");
}

#[test]
fn smollm2_logits_match_transformers() {
    logits_parity("smollm2");
}

#[test]
fn llama_greedy_generation_matches_transformers() {
    generation_parity("llama");
}

#[test]
fn mistral_greedy_generation_matches_transformers() {
    generation_parity("mistral");
}

#[test]
fn qwen2_greedy_generation_matches_transformers() {
    generation_parity("qwen2");
}

#[test]
fn smollm2_greedy_generation_matches_transformers() {
    generation_parity("smollm2");
}

#[test]
fn frozen_weights_never_require_grad() {
    let mut model = common::load_tiny();
    assert!(!model.model.embed_tokens.requires_grad());
    for (path, lin) in model.linear_layers_mut() {
        assert!(!lin.weight.dense().requires_grad(), "{path}");
    }
}
