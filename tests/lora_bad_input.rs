//! Bad adapters and merge options: one clear error line naming the cause,
//! exit status 1, and nothing half-written in the output directory.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_user_error, peft_rs};
use peft_rs::adapters::lora::files::{write_safetensors, WEIGHTS_FILE};
use peft_rs::adapters::lora::{LoraConfig, TargetModules};
use peft_rs::models;
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use tch::{Device, Kind, Tensor};

/// A valid adapter for the tiny Llama, written by peft-rs into `dir`.
fn adapter(dir: &Path) -> PathBuf {
    let mut model = models::load(&common::model_dir("llama"), Kind::Float, Device::Cpu).unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        ..LoraConfig::default()
    };
    peft_model::inject(&mut model, DEFAULT_ADAPTER, &config).unwrap();
    let out = dir.join("adapter");
    peft_model::save_adapter(&model, DEFAULT_ADAPTER, &config, &out).unwrap();
    out
}

fn edit_config(adapter: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = adapter.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_tensors(adapter: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let p = adapter.join(WEIGHTS_FILE);
    let mut t = Tensor::read_safetensors(&p).unwrap();
    f(&mut t);
    write_safetensors(&p, &t).unwrap();
}

fn generate_with(model: &Path, adapter: &Path) -> std::process::Output {
    peft_rs(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
    ])
}

fn tiny() -> PathBuf {
    common::model_dir("llama")
}

#[test]
fn adapter_for_another_base() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
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
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    edit_config(&a, |c| c["peft_type"] = "IA3".into());
    assert_user_error(
        &generate_with(&tiny(), &a),
        &["adapter_config.json", "peft_type", "IA3"],
    );
}

#[test]
fn unsupported_option() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    edit_config(&a, |c| c["use_qalora"] = true.into());
    assert_user_error(
        &generate_with(&tiny(), &a),
        &["adapter_config.json", "use_qalora"],
    );
    edit_config(&a, |c| {
        c["use_qalora"] = false.into();
        c["bias"] = "all".into();
    });
    assert_user_error(
        &generate_with(&tiny(), &a),
        &["adapter_config.json", "bias"],
    );
}

#[test]
fn rank_zero_and_bad_alpha() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    edit_config(&a, |c| c["r"] = 0.into());
    assert_user_error(&generate_with(&tiny(), &a), &["adapter_config.json", "`r`"]);
    edit_config(&a, |c| {
        c["r"] = 4.into();
        c["lora_alpha"] = (-1.0).into();
    });
    assert_user_error(
        &generate_with(&tiny(), &a),
        &["adapter_config.json", "lora_alpha"],
    );
}

#[test]
fn duplicated_and_unmatched_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    edit_config(&a, |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "v_proj", "q_proj"])
    });
    assert_user_error(
        &generate_with(&tiny(), &a),
        &["target_modules", "q_proj", "twice"],
    );
    edit_config(&a, |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "v_prj"])
    });
    assert_user_error(
        &generate_with(&tiny(), &a),
        &["v_prj", "matches no linear layer", "gate_proj", "v_proj"],
    );
}

#[test]
fn missing_and_unexpected_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    let gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    edit_tensors(&a, |t| t.retain(|(k, _)| k != gone));
    assert_user_error(&generate_with(&tiny(), &a), &[gone, "missing"]);

    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
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
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    std::fs::rename(a.join(WEIGHTS_FILE), a.join("adapter_model.bin")).unwrap();
    assert_user_error(
        &generate_with(&tiny(), &a),
        &["adapter_model.bin", "pickle"],
    );
}

#[test]
fn failed_merge_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    edit_tensors(&a, |t| {
        for (k, v) in t.iter_mut() {
            if k.ends_with("lora_B.weight") {
                *v = v.fill(f64::NAN);
            }
        }
    });
    let out = tmp.path().join("merged");
    let o = peft_rs(&[
        "merge",
        "--model",
        tiny().to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["NaN"]);
    assert!(!out.exists(), "a failed merge left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn merge_refuses_to_overwrite_and_checks_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    let out = tmp.path().join("exists");
    std::fs::create_dir_all(&out).unwrap();
    let t = tiny();
    let base = [
        "merge",
        "--model",
        t.to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    assert_user_error(&peft_rs(&base), &["already exists", "--overwrite"]);
    let mut two = base.to_vec();
    two.extend(["--adapter", a.to_str().unwrap(), "--overwrite"]);
    assert_user_error(&peft_rs(&two), &["--weights"]);
    two.extend(["--weights", "0.5"]);
    assert_user_error(&peft_rs(&two), &["--weights has 1 values for 2 adapters"]);
}
