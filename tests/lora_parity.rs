//! LoRA parity with Python PEFT, both directions, for LoRA, rsLoRA and DoRA;
//! `peft-rs merge` against PEFT's `merge_and_unload`; initialisation; weighted
//! combinations. References come from `tests/fixtures/peft_reference.py`.

mod common;

use std::path::{Path, PathBuf};

use common::{logits, masked_max_diff, peft_logits, tensors as read, Cmd};
use peft_rs::adapters::lora::{Combination, InitLoraWeights, LoraConfig, TargetModules};
use peft_rs::models::LlamaForCausalLM;
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use tch::{Kind, Tensor};

const VARIANTS: [&str; 3] = ["lora", "rslora", "dora"];

/// The PEFT fixtures: adapters, logits and merged states.
fn peft_fx() -> &'static Path {
    let tiny = common::tiny();
    let default = common::default_model();
    common::fixture("peft_reference.py", &["make"], &[&tiny, &default])
}

fn base_dir(base: &str) -> PathBuf {
    match base {
        "tiny" => common::model_dir("llama"),
        _ => common::default_model(),
    }
}

/// The fixtures of `variant` on `base`.
fn variant_dir(base: &str, variant: &str) -> PathBuf {
    peft_fx().join(base).join(variant)
}

fn inputs(base: &str) -> (PathBuf, Tensor, Tensor) {
    let p = peft_fx().join(base).join("inputs.safetensors");
    let (ids, mask) = common::ids_and_mask(&p);
    (p, ids, mask)
}

fn load_base(base: &str) -> LlamaForCausalLM {
    common::load(&base_dir(base))
}

fn python_adapter_matches(base: &str, variant: &str) {
    let (_, ids, mask) = inputs(base);
    let mut model = load_base(base);
    let dir = variant_dir(base, variant).join("adapter");
    peft_model::load_adapter(&mut model, &dir, DEFAULT_ADAPTER).unwrap();
    let ours = tch::no_grad(|| model.forward(&ids));
    let expected = logits(&variant_dir(base, variant).join("logits.safetensors"));
    let plain = tch::no_grad(|| load_base(base).forward(&ids));
    let effect = masked_max_diff(&plain, &expected, &mask);
    let d = masked_max_diff(&ours, &expected, &mask);
    eprintln!(
        "{base}/{variant}: PEFT adapter in peft-rs: max diff {d:.2e} (adapter effect {effect:.2e})"
    );
    assert!(
        effect > 1e-2,
        "the reference adapter must change the logits"
    );
    assert!(d < 1e-4, "{base}/{variant}: {d}");
}

#[test]
fn peft_adapters_load_with_peft_logits_tiny() {
    for v in VARIANTS {
        python_adapter_matches("tiny", v);
    }
}

#[test]
fn peft_adapters_load_with_peft_logits_smollm2() {
    for v in VARIANTS {
        python_adapter_matches("smollm2", v);
    }
}

/// Adapters made by peft-rs, with random B (and magnitude), saved and read
/// back by PEFT (one Python process for all `variants`).
fn our_adapters_match(base: &str, variants: &[&str]) {
    let (inputs_path, ids, mask) = inputs(base);
    let configs: Vec<LoraConfig> = variants
        .iter()
        .map(|variant| LoraConfig {
            target_modules: if base == "tiny" {
                TargetModules::AllLinear
            } else {
                TargetModules::Names(vec!["k_proj".into(), "o_proj".into(), "up_proj".into()])
            },
            use_rslora: *variant == "rslora",
            use_dora: *variant == "dora",
            ..common::lora(4, 12.0)
        })
        .collect();
    let pairs = common::our_adapters_in_peft(
        || load_base(base),
        &configs,
        &base_dir(base),
        &inputs_path,
        &ids,
    );
    for (variant, (ours, theirs)) in variants.iter().zip(&pairs) {
        let d = masked_max_diff(ours, theirs, &mask);
        eprintln!("{base}/{variant}: peft-rs adapter in PEFT: max diff {d:.2e}");
        assert!(d < 1e-4, "{base}/{variant}: {d}");
    }
}

#[test]
fn our_adapters_load_in_peft_tiny() {
    our_adapters_match("tiny", &VARIANTS);
}

#[test]
fn our_adapter_loads_in_peft_smollm2() {
    our_adapters_match("smollm2", &["dora"]);
}

fn merge_cli(base: &str, adapters: &[PathBuf], extra: &[&str], out: &Path) {
    let mut cmd = Cmd::new("merge").path("--model", &base_dir(base));
    for a in adapters {
        cmd = cmd.path("--adapter", a);
    }
    let o = cmd.path("--output", out).all(extra).run();
    assert!(
        o.status.success(),
        "merge failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn merged_matches(base: &str, variant: &str) {
    let (inputs_path, _, mask) = inputs(base);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let dir = variant_dir(base, variant);
    merge_cli(base, &[dir.join("adapter")], &[], &out);
    let theirs = peft_logits(&out, &inputs_path, None, None);
    let expected = logits(&dir.join("merged_logits.safetensors"));
    let d = masked_max_diff(&theirs, &expected, &mask);
    eprintln!("{base}/{variant}: transformers on peft-rs merge vs PEFT merge_and_unload: {d:.2e}");
    assert!(d < 1e-4, "{base}/{variant}: {d}");
}

#[test]
fn merge_matches_peft_merge_and_unload_tiny() {
    for v in VARIANTS {
        merged_matches("tiny", v);
    }
}

#[test]
fn merge_matches_peft_merge_and_unload_smollm2() {
    merged_matches("smollm2", "lora");
}

#[test]
fn merge_in_bf16_is_peft_merge_rounded_to_bf16() {
    for v in VARIANTS {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let dir = variant_dir("tiny", v);
        merge_cli("tiny", &[dir.join("adapter")], &["--dtype", "bf16"], &out);
        let ours = read(&out.join("model.safetensors"));
        let reference = read(&dir.join("merged_state.safetensors"));
        let cfg: serde_json::Value = common::read_json(&out.join("config.json"));
        assert_eq!(cfg["dtype"], "bfloat16");
        let mut merged_checked = 0;
        for (k, t) in &ours {
            assert_eq!(t.kind(), Kind::BFloat16, "{k}");
            let r = &reference[k];
            // PEFT merges in fp32; rounding its result to bf16 must give our tensor,
            // up to one bf16 step where the fp32 values differ in their last bits.
            let rounded = r.to_kind(Kind::BFloat16).to_kind(Kind::Float);
            let ulp = (r.abs() * 2f64.powi(-7)).clamp_min(1e-30);
            let excess = ((t.to_kind(Kind::Float) - rounded).abs() - ulp)
                .max()
                .double_value(&[]);
            assert!(
                excess <= 0.0,
                "{v} {k}: more than one bf16 step from PEFT's merge"
            );
            if k.contains("q_proj") {
                merged_checked += 1;
            }
        }
        assert!(merged_checked > 0);
    }
}

#[test]
fn fresh_adapters_leave_logits_exactly_unchanged() {
    let (_, ids, _) = inputs("tiny");
    let mut model = load_base("tiny");
    let before = tch::no_grad(|| model.forward(&ids));
    for (name, dora) in [("a", false), ("b", true)] {
        let config = LoraConfig {
            use_dora: dora,
            ..common::lora(8, 16.0)
        };
        peft_model::inject(&mut model, name, &config).unwrap();
        peft_model::set_active(&mut model, &[name.to_owned()]);
        let after = tch::no_grad(|| model.forward(&ids));
        assert!(
            after.equal(&before),
            "fresh adapter {name} (dora {dora}) changed the logits"
        );
    }
}

#[test]
fn initial_a_has_the_variance_of_peft_init() {
    let stats: serde_json::Value = common::read_json(&peft_fx().join("tiny/init_stats.json"));
    for (init, key) in [
        (InitLoraWeights::Default, "default"),
        (InitLoraWeights::Gaussian, "gaussian"),
    ] {
        let mut model = load_base("tiny");
        let config = LoraConfig {
            init_lora_weights: init,
            ..common::lora(64, 16.0)
        };
        tch::manual_seed(11);
        peft_model::inject(&mut model, DEFAULT_ADAPTER, &config).unwrap();
        let params = peft_model::trainable_parameters(&model);
        let a = &params["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
        let n = a.numel() as f64;
        let var = a.var(true).double_value(&[]);
        let s = if key == "default" {
            &stats
        } else {
            &stats["gaussian"]
        };
        let peft_var = s["var"].as_f64().unwrap();
        let in_f = stats["in_features"].as_f64().unwrap();
        let theory = if key == "default" {
            1.0 / (3.0 * in_f)
        } else {
            1.0 / (64.0f64 * 64.0)
        };
        // Standard error of a sample variance: var·√(2/(n-1)) for a normal,
        // var·√(0.8/(n-1)) for a uniform (kurtosis 1.8). Allow 5 standard errors.
        let se = theory * (2.0 / (n - 1.0)).sqrt();
        eprintln!("{key}: var {var:.4e}, PEFT {peft_var:.4e}, theory {theory:.4e}, se {se:.1e}");
        assert!(
            (var - theory).abs() < 5.0 * se,
            "{key}: variance {var} vs {theory}"
        );
        assert!(
            (var - peft_var).abs() < 7.0 * se,
            "{key}: variance {var} vs PEFT's {peft_var}"
        );
        if key == "default" {
            let bound = 1.0 / in_f.sqrt();
            assert!(a.abs().max().double_value(&[]) <= bound);
            // A U(-b, b) sample of this size reaches close to the bound; the ReLU-gain
            // kaiming init (2.45x wider) would exceed it.
            assert!(a.abs().max().double_value(&[]) > 0.99 * bound);
        }
        for (k, t) in &params {
            if k.ends_with("lora_B.weight") {
                assert_eq!(
                    t.abs().max().double_value(&[]),
                    0.0,
                    "{k} must start at zero"
                );
            }
        }
    }
}

#[test]
fn weighted_linear_combination_matches_peft() {
    let (inputs_path, ids, mask) = inputs("tiny");
    let w = peft_fx().join("tiny/weighted");
    let mut model = load_base("tiny");
    peft_model::load_adapters(&mut model, &[w.join("a"), w.join("b")], &[0.7, 0.3]).unwrap();
    let ours = tch::no_grad(|| model.forward(&ids));
    let expected = logits(&w.join("ab_logits.safetensors"));
    let d = masked_max_diff(&ours, &expected, &mask);
    eprintln!("weighted linear: {d:.2e}");
    assert!(d < 1e-4, "{d}");

    // PEFT's `cat` combination (exact sum of the weighted deltas), through the library.
    let mut model = load_base("tiny");
    peft_model::load_adapter(&mut model, &w.join("a"), "a").unwrap();
    peft_model::load_adapter(&mut model, &w.join("b"), "b").unwrap();
    peft_model::add_weighted_adapter(
        &mut model,
        &["a".into(), "b".into()],
        &[0.7, 0.3],
        "ab",
        Combination::Cat,
    )
    .unwrap();
    peft_model::set_active(&mut model, &["ab".to_owned()]);
    let cat = tch::no_grad(|| model.forward(&ids));
    let d = masked_max_diff(&cat, &logits(&w.join("ab_cat_logits.safetensors")), &mask);
    eprintln!("weighted cat: {d:.2e}");
    assert!(d < 1e-4, "{d}");

    // Only adapter a active.
    let mut model = load_base("tiny");
    peft_model::load_adapters(&mut model, &[w.join("a")], &[]).unwrap();
    let only_a = tch::no_grad(|| model.forward(&ids));
    assert!(masked_max_diff(&only_a, &logits(&w.join("a_logits.safetensors")), &mask) < 1e-4);

    // The merge command with weights gives PEFT's merged combination.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    merge_cli(
        "tiny",
        &[w.join("a"), w.join("b")],
        &["--weights", "0.7,0.3"],
        &out,
    );
    let theirs = peft_logits(&out, &inputs_path, None, None);
    let expected = logits(&w.join("ab_merged_logits.safetensors"));
    let d = masked_max_diff(&theirs, &expected, &mask);
    eprintln!("weighted merge: {d:.2e}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn unmerge_restores_base_weights() {
    for v in VARIANTS {
        let mut model = load_base("tiny");
        let before: Vec<Tensor> = model
            .linear_layers_mut()
            .into_iter()
            .map(|(_, l)| l.weight.dense().copy())
            .collect();
        peft_model::load_adapter(
            &mut model,
            &variant_dir("tiny", v).join("adapter"),
            DEFAULT_ADAPTER,
        )
        .unwrap();
        peft_model::merge(&mut model).unwrap();
        let changed = model
            .linear_layers_mut()
            .into_iter()
            .zip(&before)
            .filter(|((_, l), b)| !l.weight.dense().equal(b))
            .count();
        assert!(changed > 0, "{v}: merge changed nothing");
        peft_model::unmerge(&mut model).unwrap();
        for ((path, l), b) in model.linear_layers_mut().into_iter().zip(&before) {
            let rel = ((&l.weight.dense() - b).abs().max() / b.abs().max()).double_value(&[]);
            assert!(rel < 1e-5, "{v} {path}: relative error {rel} after unmerge");
        }
    }
}
