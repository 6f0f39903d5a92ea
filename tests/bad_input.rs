//! Bad input ends in one clear line naming the file and the tensor or
//! field, with exit status 1 and no panic.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_user_error, peft_rs};

/// A writable copy of the tiny Llama model.
fn copy_model(tmp: &Path) -> PathBuf {
    let src = common::model_dir("llama");
    let dst = tmp.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn generate(model: &Path) -> std::process::Output {
    peft_rs(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ])
}

fn edit_config(model: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
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
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    std::fs::remove_file(m.join("config.json")).unwrap();
    assert_user_error(&generate(&m), &["config.json"]);
}

#[test]
fn malformed_config() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    std::fs::write(m.join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    assert_user_error(&generate(&m), &["config.json", "not valid JSON"]);
}

#[test]
fn unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    edit_config(&m, |c| c["model_type"] = "gpt2".into());
    assert_user_error(
        &generate(&m),
        &[
            "config.json",
            "model_type",
            "gpt2",
            "llama, mistral, qwen2, qwen3, gemma3_text, gemma3 (text tower), phi3",
        ],
    );
}

#[test]
fn config_fields_that_change_the_math_are_refused_by_name() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &[&str]); 8] = [
        (
            |c| c["rope_parameters"]["rope_type"] = "yarn".into(),
            &[
                "rope_parameters.rope_type",
                "yarn",
                "supported: default, linear, llama3",
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
        let tmp = tempfile::tempdir().unwrap();
        let m = copy_model(tmp.path());
        edit_config(&m, edit);
        assert_user_error(&generate(&m), expected);
    }
}

#[test]
fn gemma3_checkpoint_with_another_text_model_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    edit_config(&m, |c| {
        c["model_type"] = "gemma3".into();
        c["text_config"] = serde_json::json!({"model_type": "llama"});
    });
    assert_user_error(
        &generate(&m),
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
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    edit_config(&m, |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    assert_user_error(&generate(&m), &["config.json", "hidden_size"]);
}

#[test]
fn missing_weights_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    assert_user_error(
        &generate(&m),
        &["model.safetensors", "model.safetensors.index.json"],
    );
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    let p = m.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_user_error(&generate(&m), &["model.safetensors", "truncated"]);
}

#[test]
fn header_length_beyond_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    let p = m.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let too_long = (bytes.len() as u64 * 2).to_le_bytes();
    bytes[..8].copy_from_slice(&too_long);
    std::fs::write(&p, bytes).unwrap();
    assert_user_error(&generate(&m), &["model.safetensors", "header"]);
}

#[test]
fn header_offsets_lie() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    edit_header(&m, |h| {
        let t = &mut h["model.norm.weight"];
        let end = t["data_offsets"][1].as_u64().unwrap();
        t["data_offsets"][1] = (end + 4).into();
    });
    assert_user_error(&generate(&m), &["model.safetensors"]);
}

#[test]
fn index_names_missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::model_dir("mistral");
    let m = tmp.path().join("sharded");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    std::fs::remove_file(m.join("model-00002-of-00002.safetensors")).unwrap();
    assert_user_error(
        &generate(&m),
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
        ],
    );
}

#[test]
fn tensor_of_wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    // A config that disagrees with the checkpoint: every q_proj is now too small.
    edit_config(&m, |c| c["head_dim"] = 8.into());
    assert_user_error(
        &generate(&m),
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
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    edit_header(&m, |h| {
        // Rename the tensor, so the data stays valid but the name is gone.
        let obj = h.as_object_mut().unwrap();
        let t = obj.remove("model.layers.1.mlp.up_proj.weight").unwrap();
        obj.insert("model.layers.1.mlp.up_proj.weight_renamed".into(), t);
    });
    assert_user_error(
        &generate(&m),
        &[
            "model.layers.1.mlp.up_proj.weight",
            "missing",
            "model.safetensors",
        ],
    );
}

#[test]
fn tokenizer_of_another_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    edit_config(&m, |c| c["vocab_size"] = 1000.into());
    assert_user_error(
        &generate(&m),
        &["tokenizer.json", "vocab_size = 1000", "config.json"],
    );
}

#[test]
fn missing_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    assert_user_error(&generate(&m), &["tokenizer.json", "not found"]);
}

#[test]
fn pickle_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model(tmp.path());
    std::fs::rename(m.join("model.safetensors"), m.join("pytorch_model.bin")).unwrap();
    assert_user_error(&generate(&m), &["pytorch_model.bin", "safetensors"]);
}

#[test]
fn bad_flags() {
    let m = common::model_dir("llama");
    let m = m.to_str().unwrap();
    assert_user_error(
        &peft_rs(&["generate", "--model", m, "--device", "tpu", "--prompt", "x"]),
        &["--device", "tpu"],
    );
    assert_user_error(
        &peft_rs(&[
            "generate", "--model", m, "--device", "cpu", "--prompt", "x", "--top-p", "0",
        ]),
        &["--top-p"],
    );
    assert_user_error(
        &peft_rs(&["generate", "--model", m, "--device", "cpu"]),
        &["--prompt"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("p.jsonl");
    std::fs::write(&f, "{\"prompt\": \"ok\"}\n{\"promt\": \"typo\"}\n").unwrap();
    assert_user_error(
        &peft_rs(&[
            "generate",
            "--model",
            m,
            "--device",
            "cpu",
            "--prompts",
            f.to_str().unwrap(),
        ]),
        &["p.jsonl:2"],
    );
}
