//! IA³ (`peft_type` IA3) against PEFT on the tiny Llama and Qwen2 (whose
//! adapted q/v projections have biases): PEFT's adapters load with PEFT's
//! logits, ours load strictly in PEFT, random initialisation, in-memory merge
//! and unmerge, `peft-rs merge` against `merge_and_unload`, one step's
//! gradients, and training from the CLI. References come from
//! `tests/fixtures/ia3_reference.py`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{assert_user_error, logits, masked_max_diff, tensors as read, Cmd};
use peft_rs::adapters::ia3::Ia3Config;
use peft_rs::adapters::lora::TargetModules;
use peft_rs::models::LlamaForCausalLM;
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::RegularizerStack;
use peft_rs::train::StepOptions;
use tch::Tensor;

const BASES: [&str; 2] = ["llama", "qwen2"];
/// The seed ia3_reference.py sets right before `get_peft_model`.
const SEED: i64 = 17;

fn fx() -> &'static Path {
    let (llama, qwen2) = (common::model_dir("llama"), common::model_dir("qwen2"));
    common::fixture("ia3_reference.py", &[], &[&llama, &qwen2])
}

fn names(list: &[&str]) -> TargetModules {
    TargetModules::Names(list.iter().map(|s| s.to_string()).collect())
}

/// The fixture's configuration for `base`.
fn config(base: &str) -> Ia3Config {
    let first = if base == "llama" { "k_proj" } else { "q_proj" };
    Ia3Config {
        target_modules: names(&[first, "v_proj", "down_proj"]),
        feedforward_modules: names(&["down_proj"]),
        ..Ia3Config::default()
    }
}

fn inputs(base: &str) -> (PathBuf, Tensor, Tensor) {
    let p = fx().join(base).join("inputs.safetensors");
    let (ids, mask) = common::ids_and_mask(&p);
    (p, ids, mask)
}

fn load(base: &str) -> LlamaForCausalLM {
    common::load(&common::model_dir(base))
}

fn with_peft_adapter(base: &str) -> LlamaForCausalLM {
    let mut model = load(base);
    peft_model::load_adapter(
        &mut model,
        &fx().join(base).join("adapter"),
        DEFAULT_ADAPTER,
    )
    .unwrap();
    model
}

/// max |a - b| / max |b| over the tensors of `expected`, each found in `ours`.
fn worst_rel(ours: &HashMap<String, Tensor>, expected: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(ours.len(), expected.len());
    expected
        .iter()
        .map(|(k, e)| {
            let o = ours.get(k).unwrap_or_else(|| panic!("we lack {k}"));
            let scale = e.abs().max().double_value(&[]).max(1e-30);
            (o - e).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

#[test]
fn peft_ia3_adapters_load_with_peft_logits() {
    for base in BASES {
        let (_, ids, mask) = inputs(base);
        let ours = tch::no_grad(|| with_peft_adapter(base).forward(&ids));
        let expected = logits(&fx().join(base).join("logits.safetensors"));
        let plain = tch::no_grad(|| load(base).forward(&ids));
        let (d, effect) = (
            masked_max_diff(&ours, &expected, &mask),
            masked_max_diff(&plain, &expected, &mask),
        );
        eprintln!(
            "{base}: PEFT IA³ adapter in peft-rs: max diff {d:.2e} (adapter effect {effect:.2e})"
        );
        assert!(
            effect > 1e-2,
            "the reference adapter must change the logits"
        );
        assert!(d < 1e-4, "{base}: {d}");
    }
}

/// Fresh vectors: ones leave the model exactly as it was; with
/// `init_ia3_weights` false they are PEFT's N(0, 1) draws for the same seed.
#[test]
fn fresh_vectors_are_ones_or_pefts_random_draws() {
    for base in BASES {
        let (_, ids, _) = inputs(base);
        let mut model = load(base);
        let plain = tch::no_grad(|| model.forward(&ids));
        peft_model::ia3::inject(&mut model, DEFAULT_ADAPTER, &config(base)).unwrap();
        assert!(
            tch::no_grad(|| model.forward(&ids)).equal(&plain),
            "{base}: ones changed the model"
        );
        let mut model = load(base);
        tch::manual_seed(SEED);
        let random = Ia3Config {
            init_ia3_weights: false,
            ..config(base)
        };
        peft_model::ia3::inject(&mut model, DEFAULT_ADAPTER, &random).unwrap();
        let ours: HashMap<String, Tensor> = peft_model::trainable_parameters(&model)
            .into_iter()
            .collect();
        let d = worst_rel(
            &ours,
            &read(&fx().join(base).join("random_init.safetensors")),
        );
        assert_eq!(d, 0.0, "{base}: random vectors differ from PEFT's by {d}");
    }
}

/// An adapter made by peft-rs (vectors drawn here), saved, and read back by
/// PEFT strictly (every key and value as stored), computes what peft-rs does.
#[test]
fn our_ia3_adapters_load_in_peft() {
    for base in BASES {
        let (inputs_path, ids, mask) = inputs(base);
        let mut model = load(base);
        peft_model::ia3::inject(&mut model, DEFAULT_ADAPTER, &config(base)).unwrap();
        tch::manual_seed(9);
        tch::no_grad(|| {
            for (_, t) in peft_model::trainable_parameters(&model) {
                let noise = t.randn_like() * 0.3 + 1.0;
                t.shallow_clone().copy_(&noise);
            }
        });
        let ours = tch::no_grad(|| model.forward(&ids));
        let tmp = tempfile::tempdir().unwrap();
        peft_model::save_adapter_of(&model, DEFAULT_ADAPTER, &config(base).into(), tmp.path())
            .unwrap();
        let theirs = common::peft_logits(
            &common::model_dir(base),
            &inputs_path,
            Some(tmp.path()),
            None,
        );
        let d = masked_max_diff(&ours, &theirs, &mask);
        eprintln!("{base}: peft-rs IA³ adapter in PEFT: max diff {d:.2e}");
        assert!(d < 1e-4, "{base}: {d}");
    }
}

/// In memory: merging gives PEFT's merged logits (the biases of rescaled
/// outputs scaled too), unmerging restores weights and biases.
#[test]
fn in_memory_merge_matches_peft_and_unmerge_restores() {
    for base in BASES {
        let (_, ids, mask) = inputs(base);
        let mut model = with_peft_adapter(base);
        let before: Vec<(Tensor, Option<Tensor>)> = model
            .linear_layers()
            .into_iter()
            .map(|(_, l)| (l.weight.dense().copy(), l.bias.as_ref().map(Tensor::copy)))
            .collect();
        peft_model::merge(&mut model).unwrap();
        let merged = tch::no_grad(|| model.forward(&ids));
        let expected = logits(&fx().join(base).join("merged_logits.safetensors"));
        let d = masked_max_diff(&merged, &expected, &mask);
        eprintln!("{base}: merged in memory vs PEFT merge_and_unload: {d:.2e}");
        assert!(d < 1e-4, "{base}: {d}");
        peft_model::unmerge(&mut model).unwrap();
        for ((path, l), (w, b)) in model.linear_layers().into_iter().zip(&before) {
            let rel =
                |a: &Tensor, b: &Tensor| ((a - b).abs().max() / b.abs().max()).double_value(&[]);
            assert!(
                rel(&l.weight.dense(), w) < 1e-5,
                "{base} {path}: weight after unmerge"
            );
            if let (Some(lb), Some(b)) = (&l.bias, b) {
                assert!(rel(lb, b) < 1e-5, "{base} {path}: bias after unmerge");
            }
        }
    }
}

/// `peft-rs merge` writes the tensors PEFT's `merge_and_unload` gives,
/// biases included.
#[test]
fn merge_cli_matches_peft_merge_and_unload() {
    for base in BASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        // In fp32, as the fixture loads the base (the tiny Qwen2 is stored in fp16).
        Cmd::merge(
            &common::model_dir(base),
            &fx().join(base).join("adapter"),
            &out,
        )
        .args("--dtype fp32")
        .run_ok();
        let ours = read(&out.join("model.safetensors"));
        let theirs = read(&fx().join(base).join("merged/model.safetensors"));
        let biases = ours.keys().filter(|k| k.ends_with("_proj.bias")).count();
        let d = worst_rel(&ours, &theirs);
        eprintln!("{base}: peft-rs merge vs PEFT merged tensors: worst relative diff {d:.2e} ({biases} projection biases)");
        assert!(d < 1e-6, "{base}: {d}");
    }
}

/// One training step's gradients, at the tolerance of the LoRA gradient tests.
#[test]
fn gradients_match_peft() {
    let opts = StepOptions {
        gradient_checkpointing: false,
        loss_chunk_size: 7,
    };
    for base in BASES {
        let mut model = with_peft_adapter(base);
        let (grads, loss) = common::one_step_grads(
            &mut model,
            &fx().join("batch.safetensors"),
            opts,
            &mut RegularizerStack::new(),
        );
        let d = worst_rel(&grads, &read(&fx().join(base).join("grads.safetensors")));
        let ref_loss = common::ref_loss(&fx().join(base));
        eprintln!("{base}: loss {loss:.6} (PEFT {ref_loss:.6}), worst gradient rel diff {d:.2e}");
        assert!((loss - ref_loss).abs() < 1e-5 * ref_loss.abs().max(1.0));
        assert!(d < 1e-4, "{base}: {d}");
    }
}

/// `peft-rs train --peft-type ia3` trains the vectors and saves a PEFT IA³
/// adapter that PEFT loads strictly and computes with as peft-rs does;
/// LoRA-only settings with IA³, a feed-forward module outside the targets,
/// and an IA³ adapter for llama.cpp are refused by name.
#[test]
fn cli_trains_ia3_and_refuses_what_does_not_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 16);
    let out = tmp.path().join("run");
    let line = "train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 96 --seed 7";
    Cmd::train_tiny(line, &data, &out)
        .args("--max-steps 3 --lr 5e-2 --peft-type ia3 --target-modules k_proj,v_proj,down_proj")
        .run_ok();
    let cfg: serde_json::Value = common::read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "IA3");
    assert_eq!(cfg["feedforward_modules"], serde_json::json!(["down_proj"]));
    let (inputs_path, ids, mask) = inputs("llama");
    let mut model = common::load_tiny();
    peft_model::load_adapter(&mut model, &out, DEFAULT_ADAPTER).unwrap();
    let ours = tch::no_grad(|| model.forward(&ids));
    let plain = tch::no_grad(|| common::load_tiny().forward(&ids));
    let theirs = common::peft_logits(&common::tiny(), &inputs_path, Some(&out), None);
    let (d, effect) = (
        masked_max_diff(&ours, &theirs, &mask),
        masked_max_diff(&ours, &plain, &mask),
    );
    eprintln!("trained IA³ adapter in PEFT: {d:.2e} (training moved the logits by {effect:.2e})");
    assert!(effect > 1e-3, "training changed nothing");
    assert!(d < 1e-4, "{d}");

    let bad = tmp.path().join("bad");
    for (flags, needles) in [
        ("--peft-type ia3 --use-dora", vec!["use-dora", "ia3"]),
        ("--peft-type ia3 --lora-rank 4", vec!["lora-rank", "ia3"]),
        (
            "--feedforward-modules up_proj",
            vec!["feedforward-modules", "ia3"],
        ),
        (
            "--peft-type ia3 --target-modules k_proj,v_proj --feedforward-modules down_proj",
            vec!["feedforward-modules", "subset"],
        ),
    ] {
        let o = Cmd::train_tiny("train --device cpu --max-steps 1", &data, &bad)
            .args(flags)
            .run();
        assert_user_error(&o, &needles);
    }
    // PEFT files that ask for what peft-rs does not do, or do not fit the base.
    for (edit, needles) in [
        (
            ("fan_in_fan_out", serde_json::json!(true)),
            vec!["fan_in_fan_out"],
        ),
        (
            ("use_conv_scale", serde_json::json!(2)),
            vec!["use_conv_scale", "IA3Config"],
        ),
        (
            ("feedforward_modules", serde_json::json!(["up_proj"])),
            vec!["feedforward_modules", "subset"],
        ),
        (
            ("target_modules", serde_json::json!(["q_proj", "down_proj"])),
            vec!["q_proj.ia3_l", "missing"],
        ),
    ] {
        let a = common::copy_dir(&out, &tmp.path().join("edited"));
        common::edit_json(&a.join("adapter_config.json"), |c| {
            c[edit.0] = edit.1.clone()
        });
        let o = Cmd::generate(
            &common::tiny(),
            "--device cpu --prompt hi --max-new-tokens 1",
        )
        .path("--adapter", &a)
        .run();
        assert_user_error(&o, &needles);
    }
    let o = Cmd::new("export gguf")
        .path("--model", &common::tiny())
        .path("--adapter", &out)
        .arg("--adapter-only")
        .path("--output", &tmp.path().join("a.gguf"))
        .run();
    assert_user_error(&o, &["IA³", "llama.cpp", "merge"]);
}
