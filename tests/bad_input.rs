//! Bad input ends in one clear line naming the file and the tensor or
//! field, with exit status 1 and no panic.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_user_error, copy_dir, edit_json, tiny, Cmd};

fn generate(model: &Path) -> Output {
    Cmd::generate(model, "--device cpu --prompt hi --max-new-tokens 2").run()
}

/// `generate` on a copy of `model` that `damage` has broken.
fn generate_broken_copy(model: &Path, damage: impl FnOnce(&Path)) -> Output {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_dir(model, &tmp.path().join("model"));
    damage(&m);
    generate(&m)
}

/// `generate` on a copy of the tiny Llama that `damage` has broken.
fn generate_broken(damage: impl FnOnce(&Path)) -> Output {
    generate_broken_copy(&tiny(), damage)
}

/// `generate` on a copy of the tiny Llama without `file`.
fn generate_without(file: &str) -> Output {
    generate_broken(|m| std::fs::remove_file(m.join(file)).unwrap())
}

/// `generate` on a copy of the tiny Llama with its config.json edited.
fn generate_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> Output {
    generate_broken(|m| edit_json(&m.join("config.json"), edit))
}

/// Rewrites the safetensors header of `model.safetensors` (keeping the data).
fn edit_header(model: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = model.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
}

#[test]
fn missing_model_directory() {
    let out = generate(Path::new("/nonexistent/model"));
    assert_user_error(&out, &["/nonexistent/model", "not found"]);
}

#[test]
fn missing_config() {
    let out = generate_without("config.json");
    assert_user_error(&out, &["config.json"]);
}

#[test]
fn malformed_config() {
    let out = generate_broken(|m| {
        std::fs::write(m.join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    });
    assert_user_error(&out, &["config.json", "not valid JSON"]);
}

#[test]
fn unsupported_architecture() {
    let out = generate_with_config(|c| c["model_type"] = "gpt2".into());
    assert_user_error(
        &out,
        &[
            "config.json",
            "model_type",
            "gpt2",
            "llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, gpt_oss, gemma3_text, gemma3 (text tower), phi3",
        ],
    );
}

#[test]
fn config_fields_that_change_the_math_are_refused_by_name() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &[&str]); 8] = [
        (
            |c| c["rope_parameters"]["rope_type"] = "dynamic".into(),
            &[
                "rope_parameters.rope_type",
                "dynamic",
                "supported: default, linear, llama3, yarn",
            ],
        ),
        (
            |c| {
                c["model_type"] = "gemma3_text".into();
                c["hidden_activation"] = "gelu_pytorch_tanh".into();
                c["attn_logit_softcapping"] = 50.0.into();
            },
            &["attn_logit_softcapping", "not implemented"],
        ),
        (
            |c| {
                c["model_type"] = "gemma3_text".into();
                c["hidden_activation"] = "gelu_pytorch_tanh".into();
                c["use_bidirectional_attention"] = true.into();
            },
            &["use_bidirectional_attention"],
        ),
        (
            |c| {
                c["model_type"] = "gemma3_text".into();
                c["hidden_activation"] = "gelu_pytorch_tanh".into();
                c["hidden_activation"] = "relu".into();
            },
            &["hidden_activation", "relu"],
        ),
        (
            |c| {
                c["model_type"] = "gemma3_text".into();
                c["hidden_activation"] = "gelu_pytorch_tanh".into();
                c["rope_parameters"] = serde_json::json!({
                    "full_attention": {"rope_type": "dynamic", "factor": 2.0},
                    "sliding_attention": {"rope_type": "default"}
                });
            },
            &["rope_parameters.full_attention.rope_type", "dynamic"],
        ),
        (
            |c| {
                c["rope_parameters"] = serde_json::json!({
                    "rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]
                });
            },
            &["rope_parameters.rope_type", "longrope", "phi3"],
        ),
        (
            |c| {
                c["model_type"] = "phi3".into();
                c["rope_parameters"] = serde_json::json!({
                    "rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]
                });
            },
            &["rope_parameters.short_factor", "has 1 values", "(8)"],
        ),
        (
            |c| {
                c["model_type"] = "phi3".into();
                c["resid_pdrop"] = 0.1.into();
            },
            &["resid_pdrop", "0.1"],
        ),
    ];
    for (edit, expected) in cases {
        assert_user_error(&generate_with_config(edit), expected);
    }
}

#[test]
fn gemma3_checkpoint_with_another_text_model_is_refused_by_name() {
    let out = generate_with_config(|c| {
        c["model_type"] = "gemma3".into();
        c["text_config"] = serde_json::json!({"model_type": "llama"});
    });
    assert_user_error(
        &out,
        &[
            "config.json (text_config)",
            "model_type",
            "llama",
            "gemma3_text",
        ],
    );
}

#[test]
fn missing_config_field() {
    let out = generate_with_config(|c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    assert_user_error(&out, &["config.json", "hidden_size"]);
}

#[test]
fn missing_weights_file() {
    let out = generate_without("model.safetensors");
    assert_user_error(&out, &["model.safetensors", "model.safetensors.index.json"]);
}

#[test]
fn truncated_safetensors() {
    let out = generate_broken(|m| {
        let p = m.join("model.safetensors");
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    });
    assert_user_error(&out, &["model.safetensors", "truncated"]);
}

#[test]
fn header_length_beyond_file() {
    let out = generate_broken(|m| {
        let p = m.join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        let too_long = (bytes.len() as u64 * 2).to_le_bytes();
        bytes[..8].copy_from_slice(&too_long);
        std::fs::write(&p, bytes).unwrap();
    });
    assert_user_error(&out, &["model.safetensors", "header"]);
}

#[test]
fn header_offsets_lie() {
    let out = generate_broken(|m| {
        edit_header(m, |h| {
            let t = &mut h["model.norm.weight"];
            let end = t["data_offsets"][1].as_u64().unwrap();
            t["data_offsets"][1] = (end + 4).into();
        });
    });
    assert_user_error(&out, &["model.safetensors"]);
}

#[test]
fn index_names_missing_shard() {
    let out = generate_broken_copy(&common::model_dir("mistral"), |m| {
        std::fs::remove_file(m.join("model-00002-of-00002.safetensors")).unwrap()
    });
    assert_user_error(
        &out,
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
        ],
    );
}

#[test]
fn tensor_of_wrong_shape() {
    // A config that disagrees with the checkpoint: every q_proj is now too small.
    let out = generate_with_config(|c| c["head_dim"] = 8.into());
    assert_user_error(
        &out,
        &[
            "model.safetensors",
            "model.layers.0.self_attn.q_proj.weight",
            "[64, 64]",
            "[32, 64]",
        ],
    );
}

#[test]
fn missing_tensor() {
    let out = generate_broken(|m| {
        edit_header(m, |h| {
            // Rename the tensor, so the data stays valid but the name is gone.
            let obj = h.as_object_mut().unwrap();
            let t = obj.remove("model.layers.1.mlp.up_proj.weight").unwrap();
            obj.insert("model.layers.1.mlp.up_proj.weight_renamed".into(), t);
        });
    });
    assert_user_error(
        &out,
        &[
            "model.layers.1.mlp.up_proj.weight",
            "missing",
            "model.safetensors",
        ],
    );
}

#[test]
fn tokenizer_of_another_vocabulary() {
    let out = generate_with_config(|c| c["vocab_size"] = 1000.into());
    assert_user_error(
        &out,
        &["tokenizer.json", "vocab_size = 1000", "config.json"],
    );
}

#[test]
fn missing_tokenizer() {
    let out = generate_without("tokenizer.json");
    assert_user_error(&out, &["tokenizer.json", "not found"]);
}

#[test]
fn pickle_checkpoints_are_refused() {
    let out = generate_broken(|m| {
        std::fs::rename(m.join("model.safetensors"), m.join("pytorch_model.bin")).unwrap();
    });
    assert_user_error(&out, &["pytorch_model.bin", "safetensors"]);
}

#[test]
fn bad_flags() {
    let gen = |line: &str| Cmd::generate(&tiny(), line);
    assert_user_error(&gen("--device tpu --prompt x").run(), &["--device", "tpu"]);
    assert_user_error(
        &gen("--device cpu --prompt x --top-p 0").run(),
        &["--top-p"],
    );
    assert_user_error(&gen("--device cpu").run(), &["--prompt"]);
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("p.jsonl");
    std::fs::write(&f, "{\"prompt\": \"ok\"}\n{\"promt\": \"typo\"}\n").unwrap();
    assert_user_error(
        &gen("--device cpu").path("--prompts", &f).run(),
        &["p.jsonl:2"],
    );
}
