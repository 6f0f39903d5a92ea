//! PiSSA and OLoRA initialisations (`init_lora_weights` = pissa,
//! pissa_niter_N, olora) against PEFT on the tiny Llama and Qwen2: the
//! initial A, B and residual base, one step's gradients, the conversion of a
//! trained adapter to a plain LoRA adapter against the original base, PEFT's
//! unconverted adapters, and training from the CLI. References come from
//! `tests/fixtures/init_reference.py`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{assert_user_error, logits, masked_max_diff, tensors as read, Cmd};
use peft_rs::adapters::lora::{LoraConfig, TargetModules};
use peft_rs::models::{Checkpointing, LlamaForCausalLM};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::RegularizerStack;
use peft_rs::train::StepOptions;
use tch::Tensor;

const BASES: [&str; 2] = ["llama", "qwen2"];
const INITS: [&str; 3] = ["pissa", "pissa_niter_4", "olora"];
/// The seed init_reference.py sets right before `get_peft_model`.
const SEED: i64 = 21;

fn fx() -> &'static Path {
    let (llama, qwen2) = (common::model_dir("llama"), common::model_dir("qwen2"));
    let moe = ["qwen3_moe", "mixtral", "gpt_oss"]
        .map(|m| common::arch_reference().join("models").join(m));
    common::fixture(
        "init_reference.py",
        &[],
        &[&llama, &qwen2, &moe[0], &moe[1], &moe[2]],
    )
}

fn config(init: &str) -> LoraConfig {
    LoraConfig {
        init_lora_weights: init.parse().unwrap(),
        ..common::lora(4, 8.0)
    }
}

/// The base `base` with a fresh adapter of `init`, made from the fixture's seed.
fn injected(base: &str, init: &str) -> LlamaForCausalLM {
    let mut model = common::load(&common::model_dir(base));
    tch::manual_seed(SEED);
    peft_model::inject(&mut model, DEFAULT_ADAPTER, &config(init)).unwrap();
    model
}

/// max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - b).abs().max().double_value(&[]) / scale
}

/// The worst [`rel`] over the tensors of `expected`, each found in `ours`.
fn worst(ours: &HashMap<String, Tensor>, expected: &HashMap<String, Tensor>, what: &str) -> f64 {
    assert_eq!(ours.len(), expected.len(), "{what}: tensor counts differ");
    expected
        .iter()
        .map(|(k, e)| {
            let o = ours.get(k).unwrap_or_else(|| panic!("{what}: we lack {k}"));
            assert_eq!(o.size(), e.size(), "{what}: {k}");
            rel(o, e)
        })
        .fold(0.0, f64::max)
}

fn trainable(model: &LlamaForCausalLM) -> HashMap<String, Tensor> {
    peft_model::trainable_parameters(model)
        .into_iter()
        .map(|(k, t)| (k, t.detach().copy()))
        .collect()
}

fn inputs(base: &str) -> (PathBuf, Tensor, Tensor) {
    let p = fx().join(base).join("inputs.safetensors");
    let (ids, mask) = common::ids_and_mask(&p);
    (p, ids, mask)
}

/// One seed gives PEFT's initial adapter, bit for bit: peft-rs draws what
/// PEFT's `nn.Linear` constructors draw before `init_lora_weights`
/// re-draws A (true, gaussian) or keeps them (false), module by module in
/// PEFT's order, and on a mixture of experts the routers' and experts'
/// adapters after the linear modules', in the order each sparse block
/// registers them (Qwen3-MoE its experts first, Mixtral and gpt-oss their
/// router).
#[test]
fn one_seed_draws_peft_initial_adapter_bit_for_bit() {
    let mut cases: Vec<(String, PathBuf, &str, LoraConfig)> = Vec::new();
    for base in BASES {
        for init in ["true", "gaussian", "false"] {
            cases.push((base.into(), common::model_dir(base), init, config(init)));
        }
    }
    let experts: [(&str, &[&str]); 3] = [
        ("qwen3_moe", &["gate_up_proj", "down_proj", "gate.weight"]),
        ("mixtral", &["gate_up_proj", "down_proj", "gate.weight"]),
        (
            "gpt_oss",
            &[
                "mlp.router.weight",
                "mlp.experts.gate_up_proj",
                "mlp.experts.down_proj",
            ],
        ),
    ];
    for (name, params) in experts {
        let config = LoraConfig {
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            target_parameters: params.iter().map(|p| p.to_string()).collect(),
            ..common::lora(4, 8.0)
        };
        let dir = common::arch_reference().join("models").join(name);
        cases.push((name.into(), dir, "true", config));
    }
    for (name, dir, init, config) in cases {
        let mut model = common::load(&dir);
        tch::manual_seed(SEED);
        peft_model::inject(&mut model, DEFAULT_ADAPTER, &config).unwrap();
        let expected = read(
            &fx()
                .join("seeded")
                .join(&name)
                .join(format!("{init}.safetensors")),
        );
        let what = format!("{name}, init_lora_weights {init}");
        assert_eq!(worst(&trainable(&model), &expected, &what), 0.0, "{what}");
        eprintln!(
            "{what}: {} tensors equal PEFT's bit for bit",
            expected.len()
        );
    }
}

/// A and B agree with PEFT's to 2e-5 of their largest value, and so does
/// each residual weight (measured here: bit for bit). Both come from the
/// same LAPACK routines on the same fp32 weight; the margin is for a
/// machine where a different thread count changes a blocked reduction.
/// pissa_niter_4 agrees as well, which shows its random projection is drawn
/// as PEFT draws it.
#[test]
fn pissa_and_olora_start_where_peft_starts() {
    for base in BASES {
        for init in INITS {
            let d = fx().join(base).join(init);
            let model = injected(base, init);
            let ab = worst(
                &trainable(&model),
                &read(&d.join("initial.safetensors")),
                init,
            );
            let residual: HashMap<String, Tensor> = model
                .linear_layers()
                .into_iter()
                .filter(|(_, lin)| lin.adapter.is_some())
                .map(|(p, lin)| (p, lin.weight.dense().copy()))
                .collect();
            let res = worst(&residual, &read(&d.join("residual.safetensors")), init);
            // The residual is not the base: the adapter took its share.
            let plain = common::load(&common::model_dir(base));
            let moved = plain
                .linear_layers()
                .into_iter()
                .filter(|(p, _)| residual.contains_key(p))
                .map(|(p, lin)| rel(&residual[&p], &lin.weight.dense()))
                .fold(0.0, f64::max);
            eprintln!("{base}/{init}: A, B rel diff {ab:.2e}; residual {res:.2e} (residual vs base {moved:.2e})");
            assert!(moved > 1e-2, "{base}/{init}: the base did not change");
            assert!(ab < 2e-5, "{base}/{init}: A, B differ from PEFT's by {ab}");
            assert!(res < 2e-5, "{base}/{init}: residual differs by {res}");
            // And the model still computes what the base computed.
            let (_, ids, mask) = inputs(base);
            let out = tch::no_grad(|| model.forward(&ids));
            let base_logits = logits(&fx().join(base).join("base_logits.safetensors"));
            let dl = masked_max_diff(&out, &base_logits, &mask);
            assert!(
                dl < 1e-4,
                "{base}/{init}: logits moved by {dl} at initialisation"
            );
        }
    }
}

/// One training step's gradients at initialisation, at the tolerance of the
/// LoRA gradient tests (1e-4 relative per tensor).
#[test]
fn gradients_at_initialisation_match_peft() {
    let opts = StepOptions {
        checkpointing: Checkpointing::Off,
        loss_chunk_size: 7,
        router_aux_loss_coef: None,
    };
    for base in BASES {
        for init in INITS {
            let d = fx().join(base).join(init);
            let mut model = injected(base, init);
            let (grads, loss) = common::one_step_grads(
                &mut model,
                &fx().join("batch.safetensors"),
                opts,
                &mut RegularizerStack::new(),
            );
            let g = worst(&grads, &read(&d.join("grads.safetensors")), init);
            let ref_loss = common::ref_loss(&d);
            eprintln!("{base}/{init}: loss {loss:.6} (PEFT {ref_loss:.6}), worst gradient rel diff {g:.2e}");
            assert!((loss - ref_loss).abs() < 1e-5 * ref_loss.abs().max(1.0));
            assert!(g < 1e-4, "{base}/{init}: gradients differ by {g}");
        }
    }
}

/// Sets the adapter's trainable tensors to `trained` (a fixture's "training").
fn set_trained(model: &LlamaForCausalLM, trained: &HashMap<String, Tensor>) {
    tch::no_grad(|| {
        for (k, p) in peft_model::trainable_parameters(model) {
            p.shallow_clone().copy_(&trained[&k]);
        }
    });
}

/// A trained PiSSA/OLoRA adapter computes what PEFT's does, and peft-rs saves
/// it as PEFT's `path_initial_model_for_weight_conversion` converts it: the
/// same tensors ([A; A₀], [B, −B₀]) and configuration (r and alpha doubled,
/// init_lora_weights true); PEFT loads that file strictly on the original
/// base and computes the trained model's logits.
#[test]
fn trained_adapters_save_converted_as_peft_converts_them() {
    for base in BASES {
        let (inputs_path, ids, mask) = inputs(base);
        let tmp = tempfile::tempdir().unwrap();
        for init in INITS {
            let d = fx().join(base).join(init);
            let model = injected(base, init);
            set_trained(&model, &read(&d.join("trained.safetensors")));
            let expected = logits(&d.join("trained_logits.safetensors"));
            let ours = tch::no_grad(|| model.forward(&ids));
            let dl = masked_max_diff(&ours, &expected, &mask);
            let saved = tmp.path().join(init);
            peft_model::save_adapter(&model, DEFAULT_ADAPTER, &config(init), &saved).unwrap();
            let file = |dir: &Path| read(&dir.join("adapter_model.safetensors"));
            let t = worst(&file(&saved), &file(&d.join("converted")), init);
            let json = |dir: &Path| -> serde_json::Value {
                common::read_json(&dir.join("adapter_config.json"))
            };
            let (ours_cfg, theirs_cfg) = (json(&saved), json(&d.join("converted")));
            for field in ["r", "init_lora_weights", "use_rslora"] {
                assert_eq!(ours_cfg[field], theirs_cfg[field], "{base}/{init}: {field}");
            }
            assert_eq!(
                ours_cfg["lora_alpha"].as_f64(),
                theirs_cfg["lora_alpha"].as_f64()
            );
            eprintln!(
                "{base}/{init}: trained logits vs PEFT {dl:.2e}; converted file vs PEFT's {t:.2e}"
            );
            assert!(dl < 1e-4, "{base}/{init}: logits differ by {dl}");
            assert!(t < 2e-5, "{base}/{init}: converted tensors differ by {t}");
        }
        // PEFT loads each converted file strictly on the original base.
        let dirs: Vec<PathBuf> = INITS.iter().map(|i| tmp.path().join(i)).collect();
        let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
        let theirs = common::peft_logits_each(&common::model_dir(base), &inputs_path, &dirs);
        for (init, theirs) in INITS.iter().zip(&theirs) {
            let expected = logits(
                &fx()
                    .join(base)
                    .join(init)
                    .join("trained_logits.safetensors"),
            );
            let dp = masked_max_diff(theirs, &expected, &mask);
            eprintln!("{base}/{init}: our converted adapter in PEFT on the original base {dp:.2e}");
            assert!(
                dp < 1e-4,
                "{base}/{init}: PEFT computes {dp} off with our converted adapter"
            );
        }
    }
}

/// PEFT's own saves load with PEFT's logits and greedy answers: a converted
/// adapter as plain LoRA, an unconverted PiSSA/OLoRA adapter over the
/// residual peft-rs makes, as PEFT loading it does; the converted one
/// merges (`peft-rs merge`) into PEFT's `merge_and_unload`; an unconverted
/// pissa_niter adapter, whose random start cannot be
/// made again, is refused by name, and so is merging an unconverted one
/// into the original weights.
#[test]
fn peft_saved_adapters_load_converted_or_not() {
    for base in BASES {
        let (_, ids, mask) = inputs(base);
        for init in INITS {
            let d = fx().join(base).join(init);
            let expected = logits(&d.join("trained_logits.safetensors"));
            for form in ["converted", "unconverted"] {
                let mut model = common::load(&common::model_dir(base));
                let loaded = peft_model::load_adapter(&mut model, &d.join(form), DEFAULT_ADAPTER);
                if form == "unconverted" && init == "pissa_niter_4" {
                    let e = format!("{:#}", loaded.expect_err("refused"));
                    assert!(
                        e.contains("pissa_niter_4")
                            && e.contains("path_initial_model_for_weight_conversion"),
                        "{e}"
                    );
                    continue;
                }
                loaded.unwrap();
                let dl = masked_max_diff(&tch::no_grad(|| model.forward(&ids)), &expected, &mask);
                let want: Vec<Vec<i64>> = common::read_json(&d.join("generate.json"));
                let greedy_same = common::greedy_rows(&model, &ids, 8) == want;
                eprintln!("{base}/{init}: PEFT's {form} adapter in peft-rs: {dl:.2e}; greedy answers equal: {greedy_same}");
                assert!(dl < 1e-4, "{base}/{init}/{form}: {dl}");
                assert!(greedy_same, "{base}/{init}/{form}: greedy answers differ");
            }
            // The converted adapter merged into the original base is PEFT's
            // merge_and_unload of the trained model.
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("merged");
            Cmd::merge(&common::model_dir(base), &d.join("converted"), &out)
                .args("--dtype fp32")
                .run_ok();
            let merged = tch::no_grad(|| common::load(&out).forward(&ids));
            let want = logits(&d.join("merged_logits.safetensors"));
            let dm = masked_max_diff(&merged, &want, &mask);
            eprintln!("{base}/{init}: peft-rs merge of the converted adapter vs PEFT merge_and_unload: {dm:.2e}");
            assert!(dm < 1e-4, "{base}/{init}: merged {dm}");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let unconverted = fx().join("llama/olora/unconverted");
    let out = Cmd::merge(
        &common::model_dir("llama"),
        &unconverted,
        &tmp.path().join("m"),
    )
    .run();
    assert_user_error(
        &out,
        &[
            "init_lora_weights",
            "olora",
            "path_initial_model_for_weight_conversion",
        ],
    );
}

/// `peft-rs train --init-lora-weights olora` (and pissa) trains, saves a
/// plain LoRA adapter of twice the rank, PEFT loads it strictly on the
/// original base and computes what peft-rs computes with it; a run stopped
/// after its first checkpoint and resumed ends where an unbroken run ends.
#[test]
fn cli_trains_from_pissa_and_olora_and_saves_plain_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 16);
    let (inputs_path, ids, mask) = inputs("llama");
    let inits = ["olora", "pissa_niter_2"];
    for init in inits {
        let out = tmp.path().join(init);
        common::train_tiny_small(&data, &out)
            .args(&format!(
                "--max-steps 3 --lr 1e-2 --init-lora-weights {init}"
            ))
            .run_ok();
        let cfg: serde_json::Value = common::read_json(&out.join("adapter_config.json"));
        assert_eq!(cfg["r"], 8, "{init}: saved rank");
        assert_eq!(cfg["init_lora_weights"], true, "{init}");
    }
    let dirs: Vec<PathBuf> = inits.iter().map(|i| tmp.path().join(i)).collect();
    let dir_refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let theirs = common::peft_logits_each(&common::tiny(), &inputs_path, &dir_refs);
    let plain = tch::no_grad(|| common::load_tiny().forward(&ids));
    for ((init, out), theirs) in inits.iter().zip(&dirs).zip(&theirs) {
        let mut model = common::load_tiny();
        peft_model::load_adapter(&mut model, out, DEFAULT_ADAPTER).unwrap();
        let ours = tch::no_grad(|| model.forward(&ids));
        let (d, effect) = (
            masked_max_diff(&ours, theirs, &mask),
            masked_max_diff(&ours, &plain, &mask),
        );
        eprintln!(
            "{init}: trained adapter in PEFT {d:.2e} (training moved the logits by {effect:.2e})"
        );
        assert!(effect > 1e-3, "{init}: training changed nothing");
        assert!(d < 1e-4, "{init}: {d}");
    }
    // Resumed from step 2's checkpoint: the adapter of the unbroken run.
    let whole = tmp.path().join("whole");
    common::train_tiny_small(&data, &whole)
        .args("--lr 1e-2 --init-lora-weights pissa --max-steps 4 --save-steps 2")
        .run_ok();
    let parts = common::copy_dir(&whole, &tmp.path().join("parts"));
    common::copy_dir(&whole.join("checkpoint-2"), &parts.join("checkpoint-2"));
    std::fs::remove_file(parts.join("adapter_model.safetensors")).unwrap();
    common::train_tiny_small(&data, &parts)
        .args("--lr 1e-2 --init-lora-weights pissa --max-steps 4 --save-steps 2 --resume")
        .run_ok();
    let diff = common::max_adapter_diff(&whole, &parts);
    eprintln!("pissa: resumed vs unbroken adapter max diff {diff:.2e}");
    assert!(diff < 1e-6, "{diff}");
}

/// Initialisations and combinations that cannot work are refused before
/// anything loads, each in one line naming the setting.
#[test]
fn unsupported_initialisations_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 4);
    let out = tmp.path().join("run");
    for (flags, needles) in [
        ("--init-lora-weights eva", vec!["eva", "EVA"]),
        (
            "--init-lora-weights pissa_niter_x",
            vec!["pissa_niter_x", "pissa_niter_16"],
        ),
        ("--init-lora-weights corda", vec!["corda", "CorDA"]),
        (
            "--init-lora-weights olora --use-dora",
            vec!["use-dora", "olora"],
        ),
        (
            "--init-lora-weights pissa --quantize nf4",
            vec!["pissa", "16- or 32-bit"],
        ),
    ] {
        let o = common::train_tiny_small(&data, &out)
            .args("--max-steps 1")
            .args(flags)
            .run();
        assert_user_error(&o, &needles);
    }
}
