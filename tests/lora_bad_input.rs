//! Bad adapters and merge options: one clear error line naming the cause,
//! exit status 1, and nothing half-written in the output directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{assert_user_error, edit_json, tiny, Cmd};
use peft_rs::adapters::lora::files::{write_safetensors, WEIGHTS_FILE};
use peft_rs::adapters::lora::{LoraConfig, TargetModules};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use tch::{Device, Kind, Tensor};

/// A valid adapter for the tiny Llama, written by peft-rs into a new
/// temporary folder (which it returns too).
fn adapter() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = common::load_tiny();
    let config = LoraConfig {
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        ..common::lora(4, 8.0)
    };
    peft_model::inject(&mut model, DEFAULT_ADAPTER, &config).unwrap();
    let out = tmp.path().join("adapter");
    peft_model::save_adapter(&model, DEFAULT_ADAPTER, &config, &out).unwrap();
    (tmp, out)
}

fn edit_tensors(adapter: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let p = adapter.join(WEIGHTS_FILE);
    let mut t = Tensor::read_safetensors(&p).unwrap();
    f(&mut t);
    write_safetensors(&p, &t).unwrap();
}

fn generate_with(model: &Path, adapter: &Path) -> Output {
    Cmd::generate(model, "")
        .path("--adapter", adapter)
        .args("--device cpu --prompt hi --max-new-tokens 1")
        .run()
}

/// `generate` on the tiny Llama with `adapter`, its config edited first.
fn generate_edited(adapter: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Output {
    edit_json(&adapter.join("adapter_config.json"), edit);
    generate_with(&tiny(), adapter)
}

#[test]
fn adapter_for_another_base() {
    let (_tmp, a) = adapter();
    // The tiny model's adapter has hidden size 64; SmolLM2 has 576.
    let out = generate_with(&common::default_model(), &a);
    assert_user_error(
        &out,
        &[
            "adapter_model.safetensors",
            "self_attn.q_proj.lora_A.weight",
            "[4, 64]",
            "[4, 576]",
            "another base model",
        ],
    );
}

#[test]
fn unknown_peft_type() {
    let (_tmp, a) = adapter();
    let out = generate_edited(&a, |c| c["peft_type"] = "BOFT".into());
    assert_user_error(&out, &["adapter_config.json", "peft_type", "BOFT"]);
}

#[test]
fn unsupported_option() {
    let (_tmp, a) = adapter();
    let out = generate_edited(&a, |c| c["use_qalora"] = true.into());
    assert_user_error(&out, &["adapter_config.json", "use_qalora"]);
    let out = generate_edited(&a, |c| {
        c["use_qalora"] = false.into();
        c["bias"] = "all".into();
    });
    assert_user_error(&out, &["adapter_config.json", "bias"]);
}

#[test]
fn rank_zero_and_bad_alpha() {
    let (_tmp, a) = adapter();
    let out = generate_edited(&a, |c| c["r"] = 0.into());
    assert_user_error(&out, &["adapter_config.json", "`r`"]);
    let out = generate_edited(&a, |c| {
        c["r"] = 4.into();
        c["lora_alpha"] = (-1.0).into();
    });
    assert_user_error(&out, &["adapter_config.json", "lora_alpha"]);
}

#[test]
fn duplicated_and_unmatched_targets() {
    let (_tmp, a) = adapter();
    let out = generate_edited(&a, |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "v_proj", "q_proj"])
    });
    assert_user_error(&out, &["target_modules", "q_proj", "twice"]);
    let out = generate_edited(&a, |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "v_prj"])
    });
    assert_user_error(
        &out,
        &["v_prj", "matches no linear layer", "gate_proj", "v_proj"],
    );
}

#[test]
fn missing_and_unexpected_tensors() {
    let (_tmp, a) = adapter();
    let gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    edit_tensors(&a, |t| t.retain(|(k, _)| k != gone));
    assert_user_error(&generate_with(&tiny(), &a), &[gone, "missing"]);

    let (_tmp, a) = adapter();
    let extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight";
    edit_tensors(&a, |t| {
        t.push((
            extra.into(),
            Tensor::zeros([4, 64], (Kind::Float, Device::Cpu)),
        ))
    });
    assert_user_error(&generate_with(&tiny(), &a), &[extra, "unexpected"]);
}

#[test]
fn pickle_adapter_is_refused() {
    let (_tmp, a) = adapter();
    std::fs::rename(a.join(WEIGHTS_FILE), a.join("adapter_model.bin")).unwrap();
    assert_user_error(
        &generate_with(&tiny(), &a),
        &["adapter_model.bin", "pickle"],
    );
}

#[test]
fn failed_merge_leaves_nothing_behind() {
    let (tmp, a) = adapter();
    edit_tensors(&a, |t| {
        for (k, v) in t.iter_mut() {
            if k.ends_with("lora_B.weight") {
                *v = v.fill(f64::NAN);
            }
        }
    });
    let out = tmp.path().join("merged");
    let o = Cmd::merge(&tiny(), &a, &out).run();
    assert_user_error(&o, &["NaN"]);
    assert!(!out.exists(), "a failed merge left {}", out.display());
    let leftovers = common::entries(tmp.path(), |n| n.contains("tmp"));
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn merge_refuses_to_overwrite_and_checks_weights() {
    let (tmp, a) = adapter();
    let out = tmp.path().join("exists");
    std::fs::create_dir_all(&out).unwrap();
    let base = Cmd::merge(&tiny(), &a, &out);
    assert_user_error(&base.run(), &["already exists", "--overwrite"]);
    let two = base.path("--adapter", &a).arg("--overwrite");
    assert_user_error(&two.run(), &["--weights"]);
    let two = two.args("--weights 0.5");
    assert_user_error(&two.run(), &["--weights has 1 values for 2 adapters"]);
}
