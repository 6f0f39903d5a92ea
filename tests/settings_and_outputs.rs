//! The second reliability round outside multi-process runs (those are in
//! tests/ranks.rs): settings files read as written, merges and quantized
//! checkpoints that would hold NaN or inf, outputs that would replace an
//! input, sampling and generation limits, and config values of the wrong
//! type. Each test is a case of that round, numbered as there.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{
    assert_ok, assert_user_error, copy_dir, edit_json, losses, s, scratch, stderr, tiny, Cmd,
};
use tch::Tensor;

fn data() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| common::alpaca(scratch(), 24))
}

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    let line = "train --device cpu --max-seq-len 64 --lora-rank 2 --batch-size 2 --max-steps 2 \
                --seed 5";
    Cmd::train_tiny(line, data(), out)
        .all(extra)
        .run_within(Duration::from_secs(300))
}

/// A one-step adapter of the tiny model.
fn adapter() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = scratch().join("adapter");
        assert_ok(&train(&out, &[]));
        out
    })
}

#[test]
fn case_11_a_runs_training_args_json_repeats_it_as_one_process() {
    let two = scratch().join("two-ranks");
    let r = train(&two, &["--nproc", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let recorded = two.join("training_args.json");
    // Fed back with --nproc 1: one process, the curve of a plain run.
    let again = scratch().join("again");
    let r = Cmd::new("train")
        .path("--config", &recorded)
        .path("--output", &again)
        .args("--nproc 1")
        .run_within(Duration::from_secs(300));
    let err = stderr(&r);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("`world_size` records how a run was made"),
        "{err}"
    );
    assert!(
        !err.contains("data-parallel"),
        "trained as one of several ranks: {err}"
    );
    let plain = scratch().join("plain");
    assert!(train(&plain, &[]).status.success());
    assert_eq!(losses(&again), losses(&plain));
    // world_size in a TOML file is noted and ignored, 8 or 0 alike.
    for n in ["8", "0"] {
        let toml = scratch().join(format!("world{n}.toml"));
        std::fs::write(&toml, format!("world_size = {n}\nseed = 5\n")).unwrap();
        let out = scratch().join(format!("world{n}"));
        let r = train(&out, &["--config", s(&toml)]);
        let err = stderr(&r);
        assert!(r.status.success(), "world_size = {n}: {err}");
        assert!(err.contains("world_size"), "{err}");
        assert!(!err.contains("internal error"), "{err}");
        assert_eq!(losses(&out), losses(&plain), "world_size = {n}");
    }
}

#[test]
fn case_12_non_finite_settings_are_named_with_file_and_field() {
    for (name, text, field) in [
        ("lr.toml", "learning_rate = nan\n", "learning_rate"),
        ("inf.toml", "lora_alpha = inf\n", "lora_alpha"),
        ("alpha.yaml", "lora_alpha: .nan\n", "lora_alpha"),
        ("neg.yaml", "learning_rate: -.inf\n", "learning_rate"),
        ("type.yaml", "lora_rank: sixteen\n", "lora_rank"),
    ] {
        let path = scratch().join(name);
        std::fs::write(&path, text).unwrap();
        let out = scratch().join(format!("out-{name}"));
        let r = train(&out, &["--config", s(&path)]);
        assert_user_error(&r, &[s(&path), field]);
    }
}

#[test]
fn case_13_deeply_nested_settings_fail_at_once() {
    let path = scratch().join("deep.yaml");
    let depth = 100_000;
    std::fs::write(
        &path,
        format!(
            "target_modules: {}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    let r = train(&scratch().join("deep"), &["--config", s(&path)]);
    let took = t0.elapsed();
    eprintln!("a 200 KB nested YAML file refused in {took:?}");
    assert_user_error(&r, &[s(&path), "nested"]);
    assert!(took < Duration::from_secs(10), "{took:?}");
    // A file near the size limit is refused by size before any parsing.
    std::fs::write(&path, "#".repeat(2 << 20)).unwrap();
    let r = train(&scratch().join("deep"), &["--config", s(&path)]);
    assert_user_error(&r, &[s(&path)]);
}

/// Rewrites every tensor of the safetensors file `file` as `edit(name, tensor)`.
fn map_tensors(file: &Path, edit: impl Fn(&str, Tensor) -> Tensor) {
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let t = edit(&k, t);
            (k, t)
        })
        .collect();
    Tensor::write_safetensors(&tensors, file).unwrap();
}

/// Multiplies every `lora_B` tensor of the adapter in `dir` by `factor`.
fn scale_lora_b(dir: &Path, factor: f64) {
    map_tensors(&dir.join("adapter_model.safetensors"), |k, t| {
        if k.contains("lora_B") {
            t * factor
        } else {
            t
        }
    });
}

#[test]
fn case_14_a_merge_that_overflows_fp16_is_refused_naming_the_tensor() {
    let big = copy_dir(adapter(), &scratch().join("big-adapter"));
    // B of the two-step adapter is about 4e-4; 1e10 times that makes
    // merged weights far beyond fp16's 65504, still finite in fp32.
    scale_lora_b(&big, 1e10);
    let out = scratch().join("merged-fp16");
    let merge = |dtype: &str| {
        Cmd::merge(&tiny(), &big, &out)
            .args(&format!("--dtype {dtype}"))
            .run_within(Duration::from_secs(120))
    };
    assert_user_error(
        &merge("fp16"),
        &["merged tensor", ".weight", "overflow fp16", "--dtype bf16"],
    );
    assert!(!out.exists(), "a refused merge left {}", out.display());
    // bf16 has fp32's range: the same merge works.
    let r = merge("bf16");
    assert!(r.status.success(), "{}", stderr(&r));
}

/// The tiny Llama quantized to nf4 with double quantization and saved by
/// transformers + bitsandbytes (tests/fixtures/qlora_merge_reference.py),
/// copied with its tokenizer.
fn quantized_copy(name: &str) -> PathBuf {
    let q = common::qlora_merge_reference();
    let dir = copy_dir(&q.join("base4"), &scratch().join(name));
    std::fs::copy(tiny().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    dir
}

/// Sets one tensor of `dir/model.safetensors` with `edit`.
fn edit_tensor(dir: &Path, name: &str, edit: impl Fn(&Tensor) -> Tensor) {
    map_tensors(&dir.join("model.safetensors"), |k, t| {
        if k == name {
            edit(&t)
        } else {
            t
        }
    });
}

#[test]
fn case_14_and_15_non_finite_quantization_state_is_refused_at_load() {
    let tensor = "model.layers.0.self_attn.q_proj.weight.nested_absmax";
    for (what, edit) in [
        (
            "NaN",
            (|t: &Tensor| t.fill(f64::NAN)) as fn(&Tensor) -> Tensor,
        ),
        ("inf", |t: &Tensor| t.fill(f64::INFINITY)),
    ] {
        let dir = quantized_copy(&format!("bad-state-{what}"));
        edit_tensor(&dir, tensor, edit);
        let r = Cmd::generate(&dir, "--prompt Hi --max-new-tokens 2")
            .run_within(Duration::from_secs(60));
        assert_user_error(
            &r,
            &[
                "model.safetensors",
                "model.layers.0.self_attn.q_proj.weight",
                "nested_absmax",
            ],
        );
    }
    // A dense weight with NaN quantized at load: the file and tensor named.
    let dir = copy_dir(&tiny(), &scratch().join("nan-weight"));
    let name = "model.layers.1.mlp.up_proj.weight";
    let file = dir.join("model.safetensors");
    let has = Tensor::read_safetensors(&file)
        .unwrap()
        .iter()
        .any(|(k, _)| k == name);
    assert!(has, "the tiny model is one file");
    edit_tensor(&dir, name, |t| {
        let t = t.copy();
        let _ = t.get(0).get(0).fill_(f64::NAN);
        t
    });
    let r = Cmd::generate(&dir, "--quantize nf4 --prompt Hi --max-new-tokens 2")
        .run_within(Duration::from_secs(60));
    assert_user_error(&r, &["model.safetensors", name, "NaN"]);
}

#[test]
fn case_16_answers_never_replace_an_input() {
    let copied = scratch().join("eval-data.json");
    std::fs::copy(data(), &copied).unwrap();
    let data = copied;
    let model = copy_dir(&tiny(), &scratch().join("eval-model"));
    let ad = copy_dir(adapter(), &scratch().join("eval-adapter"));
    for target in [
        data.clone(),
        model.join("tokenizer.json"),
        ad.join("adapter_config.json"),
    ] {
        let before = std::fs::read(&target).unwrap();
        let r = Cmd::new("eval")
            .path("--model", &model)
            .path("--adapter", &ad)
            .path("--data", &data)
            .args("--exact-match --max-new-tokens 2")
            .path("--answers-out", &target)
            .run_within(Duration::from_secs(120));
        assert_user_error(&r, &["--answers-out", "choose another --answers-out"]);
        assert_eq!(
            std::fs::read(&target).unwrap(),
            before,
            "{}",
            target.display()
        );
    }
}

#[test]
fn case_17_sampling_below_the_temperature_floor_is_an_error() {
    let model = tiny();
    for t in ["1e-40", "1e-45"] {
        for extra in [&[][..], &["--top-k", "5"]] {
            let r = Cmd::generate(&model, "--prompt Once --max-new-tokens 4 --temperature")
                .arg(t)
                .all(extra)
                .run_within(Duration::from_secs(60));
            assert_user_error(&r, &["--temperature", "--temperature 0"]);
        }
    }
}

#[test]
fn case_18_answers_are_capped_at_the_models_positions() {
    let t0 = Instant::now();
    let r = Cmd::generate(&tiny(), "--prompt")
        .arg("Once upon a time")
        .args("--max-new-tokens 100000 --json")
        .run_within(Duration::from_secs(300));
    let err = stderr(&r);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("capped") && err.contains("256 positions"),
        "{err}"
    );
    let answer: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&r.stdout).lines().next().unwrap()).unwrap();
    let prompt = answer["prompt_token_ids"].as_array().unwrap().len();
    let new = answer["token_ids"].as_array().unwrap().len();
    eprintln!("{prompt} + {new} tokens in {:?}", t0.elapsed());
    assert!(prompt + new <= 256, "{prompt} + {new}");
}

#[test]
fn case_19_config_values_of_the_wrong_type_are_errors() {
    let generate = |dir: &Path| {
        Cmd::generate(dir, "--prompt Hi --max-new-tokens 1").run_within(Duration::from_secs(60))
    };
    // A string where transformers reads a number: never the default instead.
    let dir = copy_dir(&tiny(), &scratch().join("typed"));
    edit_json(&dir.join("config.json"), |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": "500000"});
    });
    let r = generate(&dir);
    assert_user_error(
        &r,
        &[
            "config.json",
            "rope_parameters.rope_theta",
            "must be a number",
        ],
    );
    edit_json(&dir.join("config.json"), |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": 3});
    });
    let r = generate(&dir);
    assert_user_error(&r, &["rope_parameters.rope_type", "must be a string"]);
    edit_json(&dir.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["eos_token_id"] = serde_json::json!("2");
    });
    let r = generate(&dir);
    assert_user_error(&r, &["eos_token_id", "token id"]);
    // Phi-3's partial_rotary_factor as a string (transformers raises).
    let arch = common::arch_reference();
    let phi = copy_dir(&arch.join("models/phi3"), &scratch().join("phi3"));
    edit_json(&phi.join("config.json"), |c| {
        let params = c["rope_parameters"]
            .as_object_mut()
            .expect("rope_parameters");
        params.insert("partial_rotary_factor".into(), serde_json::json!("0.5"));
    });
    let r = generate(&phi);
    assert_user_error(
        &r,
        &["rope_parameters.partial_rotary_factor", "must be a number"],
    );
}
