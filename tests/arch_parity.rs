//! The newer architectures against transformers + PEFT, one tiny random
//! model each (built by `tests/fixtures/arch_reference.py` in one Python
//! run): right-padded logits, greedy generation (plain and chat prompts,
//! one at a time and batched), PEFT adapters in both directions (LoRA and
//! DoRA), `merge` against `merge_and_unload`, and one training step's
//! gradients. The mixtures of experts (Qwen3-MoE, Mixtral) take the same
//! checks, with adapters on their attention and dense layers.

mod common;

use std::path::PathBuf;

use common::{arch_reference as fx, logits, masked_max_diff, ref_loss, tensors as read, Cmd};
use peft_rs::adapters::lora::{LoraConfig, TargetModules};
use peft_rs::models::{self, LlamaForCausalLM};
use peft_rs::models::{Checkpointing, DecoderInput, KeptProducts};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::RegularizerStack;
use peft_rs::regularizers::{ForwardHooks, NoHooks};
use peft_rs::train::router_loss::LoadBalancing;
use peft_rs::train::StepOptions;
use tch::{Kind, Tensor};

fn model_dir(name: &str) -> PathBuf {
    fx().join("models").join(name)
}

fn load(name: &str) -> LlamaForCausalLM {
    common::load(&model_dir(name))
}

fn logits_parity(name: &str) {
    let r = read(&fx().join(name).join("logits.safetensors"));
    let model = load(name);
    let ours = tch::no_grad(|| model.forward(&r["input_ids"]));
    let d = masked_max_diff(&ours, &r["logits"], &r["attention_mask"]);
    eprintln!("{name}: max |logits - transformers| = {d:.3e} (right-padded batch)");
    assert!(d < 1e-4, "{name}: {d}");
}

fn generation_parity(name: &str) {
    let reference = fx().join(name);
    let read_json = |f: &str| -> Vec<serde_json::Value> { common::read_json(&reference.join(f)) };
    let expected = read_json("generate.json");
    let batched = read_json("generate_batched.json");
    // With LongRoPE the batch's length picks the RoPE factors for every row
    // (in transformers too): batched rows match transformers' batch, not
    // each prompt generated alone.
    let rope = models::read_config(&model_dir(name)).unwrap().rope_scaling;
    let batch_sets_rope = matches!(rope, models::rope::RopeScaling::LongRope { .. });
    for batch_size in ["1", "16"] {
        let lines = common::generate_json(
            &model_dir(name),
            &reference.join("prompts.jsonl"),
            batch_size,
        );
        assert_eq!(lines.len(), expected.len());
        for (i, (ours, theirs)) in lines.iter().zip(&expected).enumerate() {
            assert_eq!(
                ours["prompt_token_ids"], theirs["prompt_token_ids"],
                "{name} prompt {i}"
            );
            if batch_size == "1" || !batch_sets_rope {
                assert_eq!(
                    ours["token_ids"], theirs["token_ids"],
                    "{name} prompt {i}, batches of {batch_size}"
                );
            }
            if batch_size == "16" {
                assert_eq!(ours["token_ids"], batched[i], "{name} prompt {i}: batched");
            }
        }
    }
    eprintln!(
        "{name}: greedy generation identical for {} prompts (plain and chat), one at a time and batched",
        expected.len()
    );
}

fn inputs(name: &str) -> (PathBuf, Tensor, Tensor) {
    let p = fx().join(name).join("inputs.safetensors");
    let (ids, mask) = common::ids_and_mask(&p);
    (p, ids, mask)
}

/// PEFT's adapter in peft-rs (unmerged and merged in memory), and
/// `peft-rs merge` against `merge_and_unload`'s state dict and logits.
fn peft_adapter_parity(name: &str, variant: &str) {
    let (_, ids, mask) = inputs(name);
    let dir = fx().join(name).join(variant);
    let expected = logits(&dir.join("logits.safetensors"));
    let merged_expected = logits(&dir.join("merged_logits.safetensors"));
    let mut model = load(name);
    let plain = tch::no_grad(|| model.forward(&ids));
    peft_model::load_adapter(&mut model, &dir.join("adapter"), DEFAULT_ADAPTER).unwrap();
    let ours = tch::no_grad(|| model.forward(&ids));
    let effect = masked_max_diff(&plain, &expected, &mask);
    let d = masked_max_diff(&ours, &expected, &mask);
    assert!(
        effect > 1e-2,
        "the reference adapter must change the logits"
    );
    assert!(d < 1e-4, "{name}/{variant}: {d}");
    peft_model::merge(&mut model).unwrap();
    let merged = tch::no_grad(|| model.forward(&ids));
    let dm = masked_max_diff(&merged, &merged_expected, &mask);
    assert!(dm < 1e-4, "{name}/{variant} merged in memory: {dm}");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    Cmd::merge(&model_dir(name), &dir.join("adapter"), &out).run_ok();
    let state = read(&dir.join("merged_state.safetensors"));
    // The state dict names tensors by module path; a multimodal checkpoint
    // stores them as transformers saves it (`language_model.model.*`).
    let written = read(&out.join("model.safetensors"));
    let config = models::read_config(&model_dir(name))
        .unwrap()
        .with_stored_names(|n| written.contains_key(n));
    let mut worst: f64 = 0.0;
    for (k, t) in written {
        let r = [k.clone(), config.module_name(&k), format!("model.{k}")]
            .into_iter()
            .find_map(|k| state.get(&k))
            .unwrap_or_else(|| panic!("{name}/{variant}: merge wrote {k}, not in PEFT's state"));
        worst = worst.max((t.to_kind(Kind::Float) - r).abs().max().double_value(&[]));
    }
    let cli = tch::no_grad(|| common::load(&out).forward(&ids));
    let dc = masked_max_diff(&cli, &merged_expected, &mask);
    eprintln!(
        "{name}/{variant}: PEFT adapter in peft-rs {d:.2e} (effect {effect:.2e}); merged in memory {dm:.2e}; \
         `merge` weights vs merge_and_unload {worst:.2e}, its logits {dc:.2e}"
    );
    assert!(
        worst < 1e-5,
        "{name}/{variant}: merged weights differ by {worst}"
    );
    assert!(dc < 1e-4, "{name}/{variant}: merged logits {dc}");
}

/// All-linear LoRA and DoRA adapters made by peft-rs (random B, jittered
/// magnitude), saved and loaded by PEFT (strictly: every key, every value).
fn our_adapters_in_peft(name: &str) {
    let (inputs_path, ids, mask) = inputs(name);
    let variants = ["lora", "dora"];
    let configs: Vec<LoraConfig> = variants
        .iter()
        .map(|v| LoraConfig {
            use_dora: *v == "dora",
            target_modules: targets(name),
            ..common::lora(4, 12.0)
        })
        .collect();
    let pairs = common::our_adapters_in_peft(
        || load(name),
        &configs,
        &model_dir(name),
        &inputs_path,
        &ids,
    );
    for (variant, (ours, theirs)) in variants.iter().zip(&pairs) {
        let d = masked_max_diff(ours, theirs, &mask);
        eprintln!("{name}/{variant}: peft-rs adapter in PEFT: max diff {d:.2e}");
        assert!(d < 1e-4, "{name}/{variant}: {d}");
    }
}

/// The modules the adapters of `name` adapt: all linear layers, or on a
/// mixture of experts (where `all-linear` would mean the router and experts
/// too) the attention projections, as the fixture's PEFT adapters.
fn targets(name: &str) -> TargetModules {
    if name.ends_with("moe") || name == "mixtral" {
        TargetModules::Names(
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        )
    } else {
        TargetModules::AllLinear
    }
}

/// Records what the decoder's `embed_tokens` hook (where NEFTune adds its noise) sees.
struct SeeEmbedding(Option<Tensor>);

impl ForwardHooks for SeeEmbedding {
    fn embedding_output(&mut self, x: Tensor) -> Tensor {
        self.0 = Some(x.shallow_clone());
        x
    }
}

/// NEFTune's attachment point sees what transformers' forward hook on
/// `get_input_embeddings()` sees (for Gemma 3: after the √hidden scaling).
fn embedding_hook_parity(name: &str) {
    let (_, ids, mask) = inputs(name);
    let model = load(name);
    let mut seen = SeeEmbedding(None);
    let _ = tch::no_grad(|| model.forward_hidden(&DecoderInput::causal(&ids), None, &mut seen));
    let ours = seen.0.expect("the embedding hook ran");
    let theirs = read(&fx().join(name).join("embedding_hook.safetensors"))["embedding_output"]
        .shallow_clone();
    let d = masked_max_diff(&ours, &theirs, &mask);
    eprintln!("{name}: embedding hook output vs transformers' forward hook: max diff {d:.2e}");
    assert!(d == 0.0, "{name}: {d}");
}

/// One training step's adapter gradients against PEFT's (fp32, no dropout),
/// and again under checkpointing that keeps and replays every frozen
/// product (Phi-3's fused qkv_proj and gate_up_proj, Gemma 3's normed MLP
/// output, Qwen3's per-head norms after the replayed projections).
fn gradient_parity(name: &str, variant: &str) {
    let keep_all = KeptProducts {
        attention: true,
        mlp: true,
    };
    for checkpointing in [Checkpointing::Off, Checkpointing::On(keep_all)] {
        let opts = StepOptions {
            checkpointing,
            loss_chunk_size: 7,
            router_aux_loss_coef: None,
        };
        gradient_parity_with(name, variant, opts);
    }
}

/// [`gradient_parity`] with the step run as `opts` says.
fn gradient_parity_with(name: &str, variant: &str, opts: StepOptions) {
    let dir = fx().join(name).join(variant);
    let mut model = load(name);
    peft_model::load_adapter(&mut model, &dir.join("train_adapter"), DEFAULT_ADAPTER).unwrap();
    let batch = fx().join(name).join("batch.safetensors");
    let (grads, loss) =
        common::one_step_grads(&mut model, &batch, opts, &mut RegularizerStack::new());
    let theirs = read(&dir.join("grads.safetensors"));
    let ref_loss = ref_loss(&dir);
    assert!(
        (loss - ref_loss).abs() < 1e-5 * ref_loss.abs(),
        "{name}/{variant}: loss {loss} vs {ref_loss}"
    );
    assert_eq!(
        grads.len(),
        theirs.len(),
        "{name}/{variant}: trainable tensors"
    );
    let mut worst: f64 = 0.0;
    for (k, g) in &theirs {
        let o = &grads[k];
        let scale = g.abs().max().double_value(&[]);
        assert!(
            scale > 0.0,
            "{name}/{variant}: {k} has zero reference gradient"
        );
        let rel = (o - g).abs().max().double_value(&[]) / scale;
        worst = worst.max(rel);
        assert!(rel < 1e-4, "{name}/{variant}: {k}: relative error {rel}");
    }
    eprintln!(
        "{name}/{variant} ({:?}): loss {loss:.6} (PEFT {ref_loss:.6}), worst relative gradient error {worst:.2e}",
        opts.checkpointing
    );
}

/// The router's load-balancing loss, as transformers adds it when
/// `output_router_logits` is set: its value on a right-padded batch, and
/// one step's gradients of PEFT's all-linear adapter (attention, router,
/// experts; gpt-oss: attention) with the loss weighted 0.5, with and without
/// gradient checkpointing (which adds each layer's share when it recomputes it).
#[test]
fn moe_router_load_balancing_loss_matches_transformers() {
    for name in ["qwen3_moe", "mixtral", "gpt_oss"] {
        let dir = fx().join(name).join("experts_aux");
        let aux: serde_json::Value = common::read_json(&dir.join("aux.json"));
        let (want, coef) = (
            aux["aux_loss"].as_f64().unwrap(),
            aux["router_aux_loss_coef"].as_f64().unwrap(),
        );
        // The value, from the router logits of a forward pass.
        let mut model = load(name);
        peft_model::load_adapter(&mut model, &dir.join("train_adapter"), DEFAULT_ADAPTER).unwrap();
        let b = common::tensors(&fx().join(name).join("batch.safetensors"));
        let input = DecoderInput::causal(&b["input_ids"]);
        let out = tch::no_grad(|| model.decode(&input, None, &mut NoHooks, Checkpointing::Off));
        let top_k = model.config.moe.as_ref().unwrap().num_experts_per_tok as i64;
        let ours = LoadBalancing::new(&out.router_logits, &b["attention_mask"], top_k)
            .unwrap()
            .value();
        eprintln!("{name}: load-balancing loss {ours:.7} (transformers {want:.7})");
        assert!(
            (ours - want).abs() < 1e-5 * want,
            "{name}: {ours} vs {want}"
        );
        // The loss moves the gradients: without it they are another step's.
        let with = read(&dir.join("grads.safetensors"));
        let mut model = load(name);
        peft_model::load_adapter(&mut model, &dir.join("train_adapter"), DEFAULT_ADAPTER).unwrap();
        let plain = StepOptions {
            checkpointing: Checkpointing::Off,
            loss_chunk_size: 7,
            router_aux_loss_coef: None,
        };
        let batch = fx().join(name).join("batch.safetensors");
        let (without, _) =
            common::one_step_grads(&mut model, &batch, plain, &mut RegularizerStack::new());
        let moved = with
            .iter()
            .map(|(k, g)| {
                (&without[k] - g).abs().max().double_value(&[]) / g.abs().max().double_value(&[])
            })
            .fold(0.0, f64::max);
        assert!(
            moved > 1e-2,
            "{name}: the aux loss moves the gradients by only {moved}"
        );
        for checkpointing in [Checkpointing::Off, Checkpointing::FULL] {
            let opts = StepOptions {
                checkpointing,
                loss_chunk_size: 7,
                router_aux_loss_coef: Some(coef),
            };
            gradient_parity_with(name, "experts_aux", opts);
        }
    }
}

macro_rules! arch_tests {
    ($name:ident) => {
        mod $name {
            #[test]
            fn logits_match_transformers() {
                super::logits_parity(stringify!($name));
            }

            #[test]
            fn neftune_hook_sees_what_transformers_hook_sees() {
                super::embedding_hook_parity(stringify!($name));
            }

            #[test]
            fn greedy_generation_matches_transformers() {
                super::generation_parity(stringify!($name));
            }

            #[test]
            fn peft_adapters_load_and_merge_like_peft() {
                for v in ["lora", "dora"] {
                    super::peft_adapter_parity(stringify!($name), v);
                }
            }

            #[test]
            fn our_adapters_load_in_peft() {
                super::our_adapters_in_peft(stringify!($name));
            }

            #[test]
            fn gradients_match_peft() {
                for v in ["lora", "dora"] {
                    super::gradient_parity(stringify!($name), v);
                }
            }
        }
    };
}

arch_tests!(qwen3);
arch_tests!(llama32);
arch_tests!(gemma3);
arch_tests!(phi3);
arch_tests!(phi3_longrope);
arch_tests!(gemma3_mm);
arch_tests!(qwen3_moe);
arch_tests!(mixtral);
arch_tests!(gpt_oss);

/// LongRoPE switches from the short to the long factors when the sequence
/// is longer than `original_max_position_embeddings` (20 here): logits of
/// batches exactly that long and one longer against transformers.
#[test]
fn phi3_longrope_switches_factors_where_transformers_does() {
    let name = "phi3_longrope";
    let r = read(&fx().join(name).join("boundary.safetensors"));
    let model = load(name);
    let mut ours = Vec::new();
    for tag in ["short", "long"] {
        let ids = &r[&format!("{tag}_input_ids")];
        let logits = tch::no_grad(|| model.forward(ids));
        let d = masked_max_diff(
            &logits,
            &r[&format!("{tag}_logits")],
            &r[&format!("{tag}_attention_mask")],
        );
        eprintln!(
            "{name}: {} positions ({tag} factors): max |logits - transformers| = {d:.3e}",
            ids.size()[1]
        );
        assert!(d < 1e-4, "{name} {tag}: {d}");
        ours.push(logits);
    }
    // The first 20 positions change when the 21st switches the factors.
    let short = &ours[0];
    let long = ours[1].narrow(1, 0, short.size()[1]);
    let moved = masked_max_diff(short, &long, &r["short_attention_mask"]);
    assert!(
        moved > 1e-2,
        "the long factors must change the logits ({moved})"
    );
}

/// Gemma 3 multimodal checkpoints whose tensors are stored under the module
/// paths (`model.language_model.*`, as some transformers 4.x releases saved
/// them) load as those stored as transformers 5 saves them.
#[test]
fn gemma3_mm_reads_both_checkpoint_layouts() {
    let (_, ids, mask) = inputs("gemma3_mm");
    let model = load("gemma3_mm_module_names");
    assert_eq!(model.config.stored_decoder, "model.language_model");
    assert_eq!(
        load("gemma3_mm").config.stored_decoder,
        "language_model.model"
    );
    let theirs = read(
        &fx()
            .join("gemma3_mm")
            .join("module_names_logits.safetensors"),
    );
    let d = masked_max_diff(
        &tch::no_grad(|| model.forward(&ids)),
        &theirs["logits"],
        &mask,
    );
    eprintln!("gemma3_mm with module-path tensor names: max |logits - transformers| = {d:.3e}");
    assert!(d < 1e-4, "{d}");
}

/// Mixture-of-experts checkpoints load from both layouts: one tensor per
/// expert and projection (as the Hub has them and transformers 5 saves
/// them) and transformers 5's fused 3D experts (its module state dict).
#[test]
fn moe_models_read_both_expert_layouts() {
    for name in ["qwen3_moe", "mixtral"] {
        let (_, ids, mask) = inputs(name);
        let names = |dir: &str| -> Vec<String> {
            read(&model_dir(dir).join("model.safetensors"))
                .into_keys()
                .collect()
        };
        let per_expert = names(name);
        assert!(per_expert.iter().any(|k| k.contains(".experts.0.")));
        assert!(!per_expert.iter().any(|k| k.ends_with("gate_up_proj")));
        let fused_name = format!("{name}_fused");
        let fused = names(&fused_name);
        assert!(fused
            .iter()
            .any(|k| k.ends_with("mlp.experts.gate_up_proj")));
        assert!(!fused.iter().any(|k| k.contains(".experts.0.")));
        let theirs = read(&fx().join(name).join("fused_logits.safetensors"));
        let ours = tch::no_grad(|| load(&fused_name).forward(&ids));
        let d = masked_max_diff(&ours, &theirs["logits"], &mask);
        eprintln!("{name} with fused 3D experts: max |logits - transformers| = {d:.3e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// PEFT's own `all-linear` on a mixture of experts: the attention
/// projections, and the router and the experts as `target_parameters`
/// (gate_up_proj at twice the rank): PEFT's adapter in peft-rs, merged in
/// memory and by `peft-rs merge` into either checkpoint layout, and one
/// training step's gradients on every factor.
#[test]
fn moe_peft_adapters_on_experts_and_router_match_peft() {
    for name in ["qwen3_moe", "mixtral"] {
        let adapter = fx().join(name).join("experts/adapter");
        let config: serde_json::Value = common::read_json(&adapter.join("adapter_config.json"));
        assert!(
            config["target_parameters"]
                .as_array()
                .is_some_and(|a| a.len() == 3),
            "{name}: PEFT's all-linear adapts router and experts: {config}"
        );
        peft_adapter_parity(name, "experts");
        gradient_parity(name, "experts");
        let (_, ids, mask) = inputs(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        Cmd::merge(&model_dir(&format!("{name}_fused")), &adapter, &out).run_ok();
        let expected = logits(&fx().join(name).join("experts/merged_logits.safetensors"));
        let ours = tch::no_grad(|| common::load(&out).forward(&ids));
        let d = masked_max_diff(&ours, &expected, &mask);
        eprintln!("{name}/experts: `merge` into the fused-experts checkpoint, logits vs merge_and_unload {d:.2e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// gpt-oss stores its experts `[experts, in, out]` (transformers'
/// `is_transposed`), and PEFT's all-linear there is the attention: a PEFT
/// adapter on attention, router and experts named in `target_parameters` (as
/// in PEFT's own gpt-oss example) loads with PEFT's logits, merges in memory
/// and by `peft-rs merge` as `merge_and_unload`, and gives PEFT's gradients;
/// one peft-rs makes the same way loads in PEFT with peft-rs's logits.
#[test]
fn gpt_oss_adapters_on_transposed_experts_match_peft() {
    let name = "gpt_oss";
    let adapter = fx().join(name).join("experts/adapter");
    let config: serde_json::Value = common::read_json(&adapter.join("adapter_config.json"));
    let params = config["target_parameters"]
        .as_array()
        .expect("target_parameters");
    assert_eq!(params.len(), 3, "{config}");
    peft_adapter_parity(name, "experts");
    gradient_parity(name, "experts");
    let (inputs_path, ids, mask) = inputs(name);
    let ours = LoraConfig {
        target_modules: TargetModules::AllLinear,
        target_parameters: params
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect(),
        ..common::lora(4, 12.0)
    };
    let pairs =
        common::our_adapters_in_peft(|| load(name), &[ours], &model_dir(name), &inputs_path, &ids);
    let d = masked_max_diff(&pairs[0].0, &pairs[0].1, &mask);
    eprintln!("{name}: peft-rs adapter on attention, router and experts in PEFT: max diff {d:.2e}");
    assert!(d < 1e-4, "{name}: {d}");
}

/// LoRA adapters peft-rs makes with `all-linear` on a mixture of experts
/// (attention, router, experts; random B) load in PEFT, every key and value,
/// and give PEFT peft-rs's logits.
#[test]
fn our_moe_all_linear_adapters_load_in_peft() {
    for name in ["qwen3_moe", "mixtral"] {
        let (inputs_path, ids, mask) = inputs(name);
        let config = LoraConfig {
            target_modules: TargetModules::AllLinear,
            ..common::lora(4, 12.0)
        };
        let pairs = common::our_adapters_in_peft(
            || load(name),
            &[config],
            &model_dir(name),
            &inputs_path,
            &ids,
        );
        let d = masked_max_diff(&pairs[0].0, &pairs[0].1, &mask);
        eprintln!("{name}: peft-rs all-linear adapter (router, experts, attention) in PEFT: max diff {d:.2e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// The vision tower is skipped with one note; an adapter saved by peft-rs
/// names the language model's modules, not `all-linear` (which PEFT would
/// also apply to the vision tower).
#[test]
fn gemma3_mm_notes_the_skipped_tower_and_saves_exact_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Cmd::generate(
        &model_dir("gemma3_mm"),
        "--device cpu --prompt Hello --max-new-tokens 2",
    )
    .run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("skips").count(), 1, "{stderr}");
    assert!(
        stderr.contains("`vision_tower` and `multi_modal_projector`"),
        "{stderr}"
    );
    assert!(!stderr.contains("warning"), "{stderr}");

    let mut model = load("gemma3_mm");
    let config = LoraConfig {
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    };
    let chosen = peft_model::inject(&mut model, DEFAULT_ADAPTER, &config).unwrap();
    assert!(chosen
        .iter()
        .all(|p| p.starts_with("model.language_model.layers.")));
    peft_model::save_adapter(&model, DEFAULT_ADAPTER, &config, tmp.path()).unwrap();
    let saved: serde_json::Value = common::read_json(&tmp.path().join("adapter_config.json"));
    let targets: Vec<&str> = saved["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut want: Vec<&str> = chosen.iter().map(String::as_str).collect();
    want.sort();
    let mut got = targets.clone();
    got.sort();
    assert_eq!(got, want);
}

/// The frozen bytes peft-rs reports (training's memory line) are those of
/// every tensor it reads: fused projections and every norm included.
#[test]
fn frozen_bytes_count_every_tensor_read() {
    for name in [
        "qwen3",
        "llama32",
        "gemma3",
        "phi3",
        "phi3_longrope",
        "gemma3_mm",
        "qwen3_moe",
        "mixtral",
        "gpt_oss",
    ] {
        let model = load(name);
        let stored: usize = read(&model_dir(name).join("model.safetensors"))
            .iter()
            .filter(|(k, _)| !k.contains("vision_tower") && !k.contains("multi_modal_projector"))
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum();
        assert_eq!(model.frozen_bytes().0, stored, "{name}");
    }
}

/// A mixture-of-experts model trains from the command line, with named
/// targets or with `all-linear` as PEFT resolves it there (the router and
/// the experts too, saved as `target_parameters`); `all-linear` for another
/// method is refused by name, not run to something other than what PEFT +
/// transformers would do; `output_router_logits` in config.json adds the
/// router's load-balancing loss, reported in the metrics.
#[test]
fn moe_models_train_and_refuse_what_they_would_do_differently() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 8);
    let train = |model: &std::path::Path, out: &str, targets: &str| {
        Cmd::new("train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 48 --lora-rank 4 --max-steps 2")
            .path("--model", model)
            .path("--data", &data)
            .path("--output", &tmp.path().join(out))
            .args("--target-modules")
            .arg(targets)
            .run()
    };
    let attention = "q_proj,k_proj,v_proj,o_proj";
    let ok = train(&model_dir("qwen3_moe"), "ok", attention);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(tmp.path().join("ok/adapter_model.safetensors").exists());

    // all-linear: what PEFT makes of it here, saved spelled out; as in
    // PEFT, without dropout on the router and experts.
    let with_dropout = train(&model_dir("mixtral"), "dropout", "all-linear");
    let err = String::from_utf8_lossy(&with_dropout.stderr);
    assert!(!with_dropout.status.success());
    assert!(
        err.contains("`lora_dropout` is 0.05") && err.contains("--lora-dropout 0"),
        "{err}"
    );
    let all = Cmd::new("train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 48 --lora-rank 4 --max-steps 2")
        .path("--model", &model_dir("mixtral"))
        .path("--data", &data)
        .path("--output", &tmp.path().join("all"))
        .args("--target-modules all-linear --lora-dropout 0")
        .run();
    assert!(
        all.status.success(),
        "{}",
        String::from_utf8_lossy(&all.stderr)
    );
    let saved: serde_json::Value = common::read_json(&tmp.path().join("all/adapter_config.json"));
    assert_eq!(
        saved["target_parameters"],
        serde_json::json!(["gate.weight", "gate_up_proj", "down_proj"])
    );
    assert_eq!(saved["rank_pattern"][r".*\.gate_up_proj"], 8);
    let keys = read(&tmp.path().join("all/adapter_model.safetensors"));
    assert!(
        keys.contains_key("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight")
    );
    assert!(keys.contains_key("base_model.model.model.layers.0.mlp.gate.lora_B.weight"));
    // Other methods' all-linear would also take router and experts in PEFT.
    let loha = Cmd::new("train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 48 --max-steps 1 --peft-type loha")
        .path("--model", &model_dir("mixtral"))
        .path("--data", &data)
        .path("--output", &tmp.path().join("loha"))
        .args("--target-modules all-linear")
        .run();
    let err = String::from_utf8_lossy(&loha.stderr);
    assert!(!loha.status.success());
    assert!(
        err.contains("target_modules `all-linear` on a mixture-of-experts model"),
        "{err}"
    );

    let with_loss = tmp.path().join("with_router_loss");
    std::fs::create_dir(&with_loss).unwrap();
    for e in std::fs::read_dir(model_dir("mixtral")).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), with_loss.join(e.file_name())).unwrap();
    }
    let config = with_loss.join("config.json");
    let mut json: serde_json::Value = common::read_json(&config);
    json["output_router_logits"] = true.into();
    std::fs::remove_file(&config).unwrap();
    std::fs::write(&config, json.to_string()).unwrap();
    // The config's output_router_logits: the load-balancing loss is part of
    // the loss, and reported beside it.
    let run = train(&with_loss, "with_router_loss_run", attention);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let metrics =
        std::fs::read_to_string(tmp.path().join("with_router_loss_run/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let aux = first["router_aux_loss"]
        .as_f64()
        .expect("router_aux_loss reported");
    // About top_k (2) when the routing is balanced, at most 4 (every row on
    // the same two experts).
    assert!((0.5..4.01).contains(&aux), "{first}");
    // gpt-oss: all-linear is its attention, as in PEFT (no conversion of
    // its experts), here trained with the load-balancing loss on by flag.
    let gpt = Cmd::new("train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 48 --lora-rank 4 --max-steps 2 --output-router-logits")
        .path("--model", &model_dir("gpt_oss"))
        .path("--data", &data)
        .path("--output", &tmp.path().join("gpt_oss"))
        .args("--target-modules all-linear")
        .run();
    assert!(
        gpt.status.success(),
        "{}",
        String::from_utf8_lossy(&gpt.stderr)
    );
    let saved: serde_json::Value =
        common::read_json(&tmp.path().join("gpt_oss/adapter_config.json"));
    assert!(
        saved["target_parameters"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{saved}"
    );
    let metrics = std::fs::read_to_string(tmp.path().join("gpt_oss/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"router_aux_loss\""), "{metrics}");
    // Its router and experts by name (--target-parameters), as PEFT's gpt-oss example.
    let named = "mlp.router.weight,mlp.experts.gate_up_proj,mlp.experts.down_proj";
    let experts = Cmd::new("train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 48 --lora-rank 4 --max-steps 2 --lora-dropout 0")
        .path("--model", &model_dir("gpt_oss"))
        .path("--data", &data)
        .path("--output", &tmp.path().join("gpt_oss_experts"))
        .args("--target-modules all-linear --target-parameters")
        .arg(named)
        .run();
    assert!(
        experts.status.success(),
        "{}",
        String::from_utf8_lossy(&experts.stderr)
    );
    let saved: serde_json::Value =
        common::read_json(&tmp.path().join("gpt_oss_experts/adapter_config.json"));
    assert_eq!(
        saved["target_parameters"],
        serde_json::json!(named.split(',').collect::<Vec<_>>())
    );
    let keys = read(&tmp.path().join("gpt_oss_experts/adapter_model.safetensors"));
    for k in [
        "base_model.model.model.layers.2.mlp.experts.base_layer.lora_A.weight",
        "base_model.model.model.layers.2.mlp.experts.lora_B.weight",
        "base_model.model.model.layers.2.mlp.router.lora_A.weight",
    ] {
        assert!(keys.contains_key(k), "{k} missing: {:?}", keys.keys());
    }
    // A coefficient with the loss off, or either flag on a dense model, is refused by name.
    let refuse = |model: &std::path::Path, out: &str, flags: &str, want: &str| {
        let r = Cmd::new("train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 48 --lora-rank 4 --max-steps 1")
            .path("--model", model)
            .path("--data", &data)
            .path("--output", &tmp.path().join(out))
            .args(flags)
            .run();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{flags}");
        assert!(err.contains(want), "{flags}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    refuse(
        &model_dir("mixtral"),
        "coef_off",
        "--router-aux-loss-coef 0.01",
        "add --output-router-logits",
    );
    refuse(
        &model_dir("qwen3"),
        "dense",
        "--output-router-logits",
        "is not a mixture of experts",
    );
}
