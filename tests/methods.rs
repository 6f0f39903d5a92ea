//! The adapter methods beside LoRA — IA³ (`peft_type` IA3), LoHa (LOHA),
//! LoKr (LOKR) and VeRA (VERA) —
//! against PEFT on the tiny Llama and Qwen2 (whose adapted q/v projections
//! have biases): PEFT's adapters load with PEFT's logits, ours load strictly
//! in PEFT, initialisation (PEFT's draws for a seed), in-memory merge and
//! unmerge, `peft-rs merge` against `merge_and_unload`, one step's
//! gradients, and training from the CLI. References come from
//! `tests/fixtures/method_reference.py`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{assert_user_error, logits, masked_max_diff, tensors as read, Cmd};
use peft_rs::adapters::ia3::Ia3Config;
use peft_rs::adapters::loha::LohaConfig;
use peft_rs::adapters::lokr::{InitWeights, LokrConfig};
use peft_rs::adapters::lora::TargetModules;
use peft_rs::adapters::lycoris::LycorisConfig;
use peft_rs::adapters::method::AdapterConfig;
use peft_rs::adapters::vera::VeraConfig;
use peft_rs::models::{Checkpointing, LlamaForCausalLM};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::RegularizerStack;
use peft_rs::train::StepOptions;
use tch::Tensor;

const BASES: [&str; 2] = ["llama", "qwen2"];
const METHODS: [&str; 4] = ["ia3", "loha", "lokr", "vera"];
/// The seed method_reference.py sets right before `get_peft_model`.
const SEED: i64 = 17;

/// The fixtures of `method` (ia3, loha, lokr, vera).
fn fx(method: &str) -> PathBuf {
    let (llama, qwen2) = (common::model_dir("llama"), common::model_dir("qwen2"));
    common::fixture("method_reference.py", &[], &[&llama, &qwen2]).join(method)
}

fn names(list: &[&str]) -> TargetModules {
    TargetModules::Names(list.iter().map(|s| s.to_string()).collect())
}

/// The fixture's configuration of `method` for `base`, initialised at
/// random or as a no-op.
fn config(method: &str, base: &str, random_init: bool) -> AdapterConfig {
    let first = if base == "llama" { "k_proj" } else { "q_proj" };
    let target_modules = names(&[first, "v_proj", "down_proj"]);
    match method {
        "ia3" => Ia3Config {
            target_modules,
            feedforward_modules: names(&["down_proj"]),
            init_ia3_weights: !random_init,
            ..Ia3Config::default()
        }
        .into(),
        "loha" => LohaConfig {
            lycoris: LycorisConfig {
                r: 4,
                alpha: 8.0,
                target_modules,
                ..LycorisConfig::default()
            },
            init_weights: !random_init,
        }
        .into(),
        "lokr" => lokr_config(base, target_modules, random_init),
        _ => VeraConfig {
            r: 4,
            target_modules,
            init_weights: !random_init,
            // On qwen2 the projections are not saved: drawn again from the key.
            save_projection: base == "llama",
            projection_prng_key: if base == "llama" { 0 } else { 5 },
            ..VeraConfig::default()
        }
        .into(),
    }
}

/// The fixture's LoKr: r 2 (8 on v_proj, where both factors are whole),
/// on llama with decompose_both, on qwen2 with decompose_factor 4.
fn lokr_config(base: &str, target_modules: TargetModules, random_init: bool) -> AdapterConfig {
    let llama = base == "llama";
    LokrConfig {
        lycoris: LycorisConfig {
            r: 2,
            alpha: 4.0,
            target_modules,
            rank_pattern: [("v_proj".to_owned(), 8)].into(),
            ..LycorisConfig::default()
        },
        init_weights: if random_init {
            InitWeights::False
        } else {
            InitWeights::True
        },
        decompose_both: llama,
        decompose_factor: if llama { -1 } else { 4 },
        rank_dropout_scale: true,
    }
    .into()
}

fn inputs(base: &str) -> (PathBuf, Tensor, Tensor) {
    let p = fx("ia3").join(base).join("inputs.safetensors");
    let (ids, mask) = common::ids_and_mask(&p);
    (p, ids, mask)
}

fn load(base: &str) -> LlamaForCausalLM {
    common::load(&common::model_dir(base))
}

fn with_peft_adapter(method: &str, base: &str) -> LlamaForCausalLM {
    let mut model = load(base);
    let dir = fx(method).join(base).join("adapter");
    peft_model::load_adapter(&mut model, &dir, DEFAULT_ADAPTER).unwrap();
    model
}

/// Runs `f` for every method and base, with the folder of their fixtures.
fn each(mut f: impl FnMut(&str, &str, &Path)) {
    for method in METHODS {
        for base in BASES {
            f(method, base, &fx(method).join(base));
        }
    }
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

/// PEFT's adapters give PEFT's logits and greedy answers.
#[test]
fn peft_adapters_load_with_peft_logits() {
    each(|method, base, d| {
        let d_dir = d.to_path_buf();
        let (_, ids, mask) = inputs(base);
        let ours = tch::no_grad(|| with_peft_adapter(method, base).forward(&ids));
        let expected = logits(&d.join("logits.safetensors"));
        let plain = tch::no_grad(|| load(base).forward(&ids));
        let (d, effect) = (
            masked_max_diff(&ours, &expected, &mask),
            masked_max_diff(&plain, &expected, &mask),
        );
        let want: Vec<Vec<i64>> = common::read_json(&d_dir.join("generate.json"));
        let got = common::greedy_rows(&with_peft_adapter(method, base), &ids, 8);
        assert_eq!(
            got, want,
            "{method}/{base}: greedy answers differ from PEFT's"
        );
        eprintln!("{method}/{base}: PEFT adapter in peft-rs: max diff {d:.2e} (adapter effect {effect:.2e}); greedy answers equal");
        assert!(
            effect > 1e-2,
            "the reference adapter must change the logits"
        );
        assert!(d < 1e-4, "{method}/{base}: {d}");
    });
}

/// Fresh adapters: by default they leave the model exactly as it was (IA³'s
/// ones, LoHa's zero W2b, LoKr's zero W1); initialised at random (and LoKr
/// "lycoris") they are PEFT's draws for the same seed, bit for bit.
#[test]
fn fresh_adapters_are_no_ops_or_pefts_random_draws() {
    each(|method, base, d| {
        let (_, ids, _) = inputs(base);
        let mut model = load(base);
        let plain = tch::no_grad(|| model.forward(&ids));
        peft_model::inject_adapter(&mut model, DEFAULT_ADAPTER, &config(method, base, false))
            .unwrap();
        let fresh = tch::no_grad(|| model.forward(&ids));
        assert!(
            fresh.equal(&plain),
            "{method}/{base}: a fresh adapter changed the model"
        );
        let mut model = load(base);
        tch::manual_seed(SEED);
        peft_model::inject_adapter(&mut model, DEFAULT_ADAPTER, &config(method, base, true))
            .unwrap();
        let ours: HashMap<String, Tensor> = peft_model::trainable_parameters(&model)
            .into_iter()
            .collect();
        let diff = worst_rel(&ours, &read(&d.join("random_init.safetensors")));
        assert_eq!(
            diff, 0.0,
            "{method}/{base}: random tensors differ from PEFT's by {diff}"
        );
        if method == "vera" && base == "llama" {
            // The shared projections, saved with this adapter.
            let shared: HashMap<String, Tensor> =
                peft_model::adapter_tensors(&model, DEFAULT_ADAPTER)
                    .into_iter()
                    .filter(|(k, _)| !k.contains("lambda"))
                    .collect();
            let diff = worst_rel(&shared, &read(&d.join("projections.safetensors")));
            assert_eq!(diff, 0.0, "vera/{base}: projections differ by {diff}");
        }
        if method == "lokr" {
            let mut model = load(base);
            let AdapterConfig::Lokr(mut cfg) = config(method, base, false) else {
                unreachable!()
            };
            cfg.init_weights = InitWeights::Lycoris;
            tch::manual_seed(SEED);
            peft_model::inject_adapter(&mut model, DEFAULT_ADAPTER, &cfg.into()).unwrap();
            let lycoris = tch::no_grad(|| model.forward(&ids));
            assert!(
                lycoris.equal(&plain),
                "{base}: lycoris init changed the model"
            );
            let ours: HashMap<String, Tensor> = peft_model::trainable_parameters(&model)
                .into_iter()
                .collect();
            let diff = worst_rel(&ours, &read(&d.join("lycoris_init.safetensors")));
            assert_eq!(diff, 0.0, "lokr/{base}: lycoris init differs by {diff}");
        }
    });
}

/// An adapter made by peft-rs (random, then each tensor moved), saved, and
/// read back by PEFT strictly (every key and value as stored), computes what
/// peft-rs does.
#[test]
fn our_adapters_load_in_peft() {
    for base in BASES {
        let (inputs_path, ids, mask) = inputs(base);
        let tmp = tempfile::tempdir().unwrap();
        let mut ours = Vec::new();
        for method in METHODS {
            let mut model = load(base);
            let cfg = config(method, base, method != "ia3");
            peft_model::inject_adapter(&mut model, DEFAULT_ADAPTER, &cfg).unwrap();
            tch::manual_seed(9);
            tch::no_grad(|| {
                for (_, t) in peft_model::trainable_parameters(&model) {
                    let moved = match method {
                        "ia3" => t.randn_like() * 0.3 + 1.0,
                        _ => &t * (t.randn_like() * 0.3 + 1.0),
                    };
                    t.shallow_clone().copy_(&moved);
                }
            });
            ours.push(tch::no_grad(|| model.forward(&ids)));
            let dir = tmp.path().join(method);
            peft_model::save_adapter_of(&model, DEFAULT_ADAPTER, &cfg, &dir).unwrap();
        }
        let theirs = peft_logits_of_dirs(base, &inputs_path, tmp.path(), &METHODS);
        for ((method, ours), theirs) in METHODS.iter().zip(&ours).zip(&theirs) {
            let d = masked_max_diff(ours, theirs, &mask);
            eprintln!("{method}/{base}: peft-rs adapter in PEFT: max diff {d:.2e}");
            assert!(d < 1e-4, "{method}/{base}: {d}");
        }
    }
}

/// PEFT's logits on `inputs` with each adapter `parent/NAME`, in one Python process.
fn peft_logits_of_dirs(base: &str, inputs: &Path, parent: &Path, names: &[&str]) -> Vec<Tensor> {
    let dirs: Vec<PathBuf> = names.iter().map(|n| parent.join(n)).collect();
    let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    common::peft_logits_each(&common::model_dir(base), inputs, &dirs)
}

/// In memory: merging gives PEFT's merged logits (IA³ scales the biases of
/// rescaled outputs too), unmerging restores weights and biases.
#[test]
fn in_memory_merge_matches_peft_and_unmerge_restores() {
    each(|method, base, d| {
        let (_, ids, mask) = inputs(base);
        let mut model = with_peft_adapter(method, base);
        let before: Vec<(Tensor, Option<Tensor>)> = model
            .linear_layers()
            .into_iter()
            .map(|(_, l)| (l.weight.dense().copy(), l.bias.as_ref().map(Tensor::copy)))
            .collect();
        peft_model::merge(&mut model).unwrap();
        let merged = tch::no_grad(|| model.forward(&ids));
        let expected = logits(&d.join("merged_logits.safetensors"));
        let diff = masked_max_diff(&merged, &expected, &mask);
        eprintln!("{method}/{base}: merged in memory vs PEFT merge_and_unload: {diff:.2e}");
        assert!(diff < 1e-4, "{method}/{base}: {diff}");
        peft_model::unmerge(&mut model).unwrap();
        let rel = |a: &Tensor, b: &Tensor| ((a - b).abs().max() / b.abs().max()).double_value(&[]);
        for ((path, l), (w, b)) in model.linear_layers().into_iter().zip(&before) {
            assert!(
                rel(&l.weight.dense(), w) < 1e-5,
                "{method}/{base} {path}: weight after unmerge"
            );
            if let (Some(lb), Some(b)) = (&l.bias, b) {
                assert!(
                    rel(lb, b) < 1e-5,
                    "{method}/{base} {path}: bias after unmerge"
                );
            }
        }
    });
}

/// `peft-rs merge` writes the tensors PEFT's `merge_and_unload` gives,
/// biases included.
#[test]
fn merge_cli_matches_peft_merge_and_unload() {
    each(|method, base, d| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        // In fp32, as the fixture loads the base (the tiny Qwen2 is stored in fp16).
        Cmd::merge(&common::model_dir(base), &d.join("adapter"), &out)
            .args("--dtype fp32")
            .run_ok();
        let ours = read(&out.join("model.safetensors"));
        let theirs = read(&d.join("merged/model.safetensors"));
        let diff = worst_rel(&ours, &theirs);
        eprintln!(
            "{method}/{base}: peft-rs merge vs PEFT merged tensors: worst relative diff {diff:.2e}"
        );
        assert!(diff < 1e-6, "{method}/{base}: {diff}");
    });
}

/// One training step's gradients, at the tolerance of the LoRA gradient tests.
#[test]
fn gradients_match_peft() {
    let opts = StepOptions {
        checkpointing: Checkpointing::Off,
        loss_chunk_size: 7,
        router_aux_loss_coef: None,
    };
    each(|method, base, d| {
        let mut model = with_peft_adapter(method, base);
        let batch = d.parent().unwrap().join("batch.safetensors");
        let (grads, loss) =
            common::one_step_grads(&mut model, &batch, opts, &mut RegularizerStack::new());
        let diff = worst_rel(&grads, &read(&d.join("grads.safetensors")));
        let ref_loss = common::ref_loss(d);
        eprintln!("{method}/{base}: loss {loss:.6} (PEFT {ref_loss:.6}), worst gradient rel diff {diff:.2e}");
        assert!((loss - ref_loss).abs() < 1e-5 * ref_loss.abs().max(1.0));
        assert!(diff < 1e-4, "{method}/{base}: {diff}");
    });
}

/// `peft-rs train --peft-type ia3|loha|lokr|vera` trains and saves an adapter
/// that PEFT loads strictly and computes with as peft-rs does.
#[test]
fn cli_trains_each_method() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 16);
    let (inputs_path, ids, mask) = inputs("llama");
    let line =
        "train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 96 --seed 7 --max-steps 3";
    for (method, flags, peft_type) in [
        ("ia3", "--lr 5e-2 --peft-type ia3 --target-modules k_proj,v_proj,down_proj", "IA3"),
        ("loha", "--lr 1e-2 --peft-type loha --lora-rank 4 --lora-alpha 8 --target-modules q_proj,v_proj,down_proj", "LOHA"),
        ("lokr", "--lr 1e-2 --peft-type lokr --lora-rank 2 --lora-alpha 4 --decompose-both --rank-dropout 0.1 --target-modules q_proj,v_proj,down_proj", "LOKR"),
        ("vera", "--lr 5e-2 --peft-type vera --lora-rank 8 --vera-dropout 0.1 --save-projection false --target-modules q_proj,v_proj,down_proj", "VERA"),
    ] {
        let out = tmp.path().join(method);
        Cmd::train_tiny(line, &data, &out).args(flags).run_ok();
        let cfg: serde_json::Value = common::read_json(&out.join("adapter_config.json"));
        assert_eq!(cfg["peft_type"], peft_type);
    }
    let plain = tch::no_grad(|| common::load_tiny().forward(&ids));
    let theirs = peft_logits_of_dirs("llama", &inputs_path, tmp.path(), &METHODS);
    for (method, theirs) in METHODS.iter().zip(&theirs) {
        let mut model = common::load_tiny();
        peft_model::load_adapter(&mut model, &tmp.path().join(method), DEFAULT_ADAPTER).unwrap();
        let ours = tch::no_grad(|| model.forward(&ids));
        let (d, effect) = (
            masked_max_diff(&ours, theirs, &mask),
            masked_max_diff(&ours, &plain, &mask),
        );
        eprintln!("{method}: trained adapter in PEFT: {d:.2e} (training moved the logits by {effect:.2e})");
        assert!(effect > 1e-3, "{method}: training changed nothing");
        assert!(d < 1e-4, "{method}: {d}");
    }
}

/// Settings of another method, a feed-forward module outside the targets,
/// PEFT files asking for what peft-rs does not do, and these adapters for
/// llama.cpp are refused by name.
#[test]
fn what_does_not_apply_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 4);
    let out = common::copy_dir(&fx("ia3").join("llama/adapter"), &tmp.path().join("ia3"));

    let bad = tmp.path().join("bad");
    for (flags, needles) in [
        ("--peft-type ia3 --use-dora", vec!["use-dora", "ia3"]),
        ("--peft-type ia3 --lora-rank 4", vec!["lora-rank", "ia3"]),
        ("--peft-type loha --use-rslora", vec!["use-rslora", "loha"]),
        ("--rank-dropout 0.1", vec!["rank-dropout", "loha"]),
        (
            "--peft-type loha --init-weights lycoris",
            vec!["init-weights", "lokr"],
        ),
        ("--decompose-both", vec!["decompose-both", "lokr"]),
        ("--vera-dropout 0.1", vec!["vera-dropout", "vera"]),
        (
            "--peft-type vera --lora-alpha 4",
            vec!["lora-alpha", "vera"],
        ),
        (
            "--peft-type lokr --decompose-factor 0",
            vec!["decompose-factor", "-1"],
        ),
        (
            "--peft-type loha --module-dropout 1.5",
            vec!["module-dropout", "[0, 1)"],
        ),
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
            ("peft_type", serde_json::json!("BOFT")),
            vec!["peft_type", "BOFT"],
        ),
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
