//! QLoRA against transformers + bitsandbytes + PEFT on the CPU
//! (`tests/fixtures/qlora_reference.py`): logits of 4-bit models with and
//! without a PEFT adapter, greedy generation of the 4-bit SmolLM2, and one
//! training step's adapter gradients on a 4-bit base.
//!
//! bitsandbytes' CPU path (no AVX512-BF16) runs a 4-bit layer as
//! `linear(x, dequantize_4bit(W).to(compute_dtype))`; peft-rs dequantizes to
//! the same bytes (tests/quant.rs) and calls the same libtorch matmul, so the
//! logits agree to fp32 rounding of the matmul order at most.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{load_tiny, peft_logits, read_json, ref_loss, tensor_diff as diff, tensors as read};
use peft_rs::generate::{generate, GenerationConfig};
use peft_rs::models::{self, Checkpointing, KeptProducts, LlamaForCausalLM, Pretrained};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::quant::{BnbQuantization, Quantize};
use peft_rs::regularizers::RegularizerStack;
use peft_rs::train::StepOptions;
use tch::{Device, Kind, Tensor};

fn fx() -> &'static Path {
    common::fixture(
        "qlora_reference.py",
        &[],
        &[&common::tiny(), &common::default_model()],
    )
}

fn nf4_dq() -> BnbQuantization {
    Quantize::Nf4.config(true, Kind::Float)
}

fn tiny(q: &BnbQuantization) -> LlamaForCausalLM {
    models::load_quantized(&common::tiny(), Kind::Float, Device::Cpu, Some(q)).unwrap()
}

/// fp32 logits of the same dequantized weights: the matmuls may sum in
/// another order than PyTorch's (the same libtorch, but other shapes or
/// threads), each a few ulps of values of magnitude ~10, amplified through the
/// layers; 1e-4 absolute is ~1e-5 relative, far below the smallest change
/// one 4-bit code makes (a code step times an absmax, ~1e-3 of a weight).
const LOGIT_TOL: f64 = 1e-4;

#[test]
fn tiny_4bit_logits_match_bitsandbytes() {
    let ids = read(&fx().join("batch.safetensors"))["input_ids"].shallow_clone();
    for (name, q) in [
        ("nf4_dq", nf4_dq()),
        ("fp4", Quantize::Fp4.config(false, Kind::Float)),
    ] {
        let model = tiny(&q);
        let ours = tch::no_grad(|| model.forward(&ids));
        let theirs = &read(&fx().join("tiny").join(name).join("logits.safetensors"))["logits"];
        let (d, scale) = diff(&ours, theirs);
        eprintln!("tiny {name}: max |logit diff| {d:.3e} (max |logit| {scale:.2})");
        assert!(d < LOGIT_TOL, "{name}: {d}");
        // Quantization did change the model: the unquantized logits differ.
        let dense = load_tiny();
        let (dd, _) = diff(&tch::no_grad(|| dense.forward(&ids)), theirs);
        assert!(
            dd > 100.0 * LOGIT_TOL,
            "{name}: 4-bit logits equal the fp32 ones ({dd})"
        );
    }
}

/// bf16 compute on a 4-bit base, against bitsandbytes' two CPU paths:
/// dequantize-then-linear in bf16 (every CPU; what peft-rs computes, so the
/// same bf16 matmul up to its summation order) and, on a CPU with
/// AVX512-BF16, the fused kernel bitsandbytes takes there at inference, which
/// rounds the input and the absmax values to bf16 and computes in its own
/// order. That kernel is another bf16 computation of the model, so it is held
/// to how far a bf16 computation is from fp32 on the same model, not to the
/// dequantize path's equality.
#[test]
fn tiny_4bit_bf16_compute_matches_both_bitsandbytes_cpu_paths() {
    let ids = read(&fx().join("batch.safetensors"))["input_ids"].shallow_clone();
    let model = tiny(&Quantize::Nf4.config(true, Kind::BFloat16));
    let ours = tch::no_grad(|| model.forward(&ids));
    let dir = fx().join("tiny").join("nf4_dq_bf16");
    let fp32 = &read(&fx().join("tiny/nf4_dq/logits.safetensors"))["logits"];
    let (bf16_vs_fp32, scale) = diff(&ours, fp32);
    let (d, _) = diff(
        &ours,
        &read(&dir.join("dequant/logits.safetensors"))["logits"],
    );
    eprintln!(
        "tiny nf4_dq, bf16 compute: vs bitsandbytes' dequantize path {d:.3e}, vs fp32 compute {bf16_vs_fp32:.3e} (max |logit| {scale:.2})"
    );
    assert!(
        bf16_vs_fp32 > 1e-3,
        "bf16 compute equals fp32 compute: the dtype was not applied"
    );
    // Both round the inputs and weights to bf16 and accumulate in fp32; the
    // order of the sums may differ, and each bf16 rounding of a layer's
    // output is 2^-9 relative.
    assert!(d < bf16_vs_fp32 / 4.0, "{d} vs {bf16_vs_fp32}");
    let cpu: serde_json::Value = read_json(&fx().join("cpu.json"));
    let kernel = dir.join("kernel/logits.safetensors");
    assert_eq!(
        kernel.exists(),
        cpu["bitsandbytes_avx512bf16"].as_bool().unwrap(),
        "the fused-kernel reference exists exactly where the CPU has AVX512-BF16"
    );
    if kernel.exists() {
        let kernel = &read(&kernel)["logits"];
        let rel =
            |a: &Tensor, b: &Tensor| (a - b).norm().double_value(&[]) / b.norm().double_value(&[]);
        let (k, _) = diff(&ours, kernel);
        let (kernel_vs_fp32, _) = diff(kernel, fp32);
        eprintln!(
            "  vs bitsandbytes' fused AVX512-BF16 kernel {k:.3e} (kernel vs fp32 {kernel_vs_fp32:.3e}); relative L2: ours-kernel {:.3e}, ours-fp32 {:.3e}, kernel-fp32 {:.3e}; argmax agree {:.3}",
            rel(&ours, kernel), rel(&ours, fp32), rel(kernel, fp32),
            ours.argmax(-1, false).eq_tensor(&kernel.argmax(-1, false)).to_kind(Kind::Float).mean(Kind::Float).double_value(&[])
        );
        // Two bf16 computations of one model differ as each differs from
        // fp32 (here 1-2% of the logits' norm, bf16 keeping 8 bits); a wrong
        // block scale or code would move the logits by tens of percent.
        let (ok, ok_fp32, kernel_fp32) = (rel(&ours, kernel), rel(&ours, fp32), rel(kernel, fp32));
        assert!(
            ok < 2.0 * ok_fp32.max(kernel_fp32),
            "peft-rs bf16 vs the fused kernel {ok:.3e}, each vs fp32 {ok_fp32:.3e} {kernel_fp32:.3e}"
        );
    }
}

#[test]
fn tiny_lora_logits_on_4bit_base_match_peft() {
    let ids = read(&fx().join("batch.safetensors"))["input_ids"].shallow_clone();
    let dir = fx().join("tiny").join("lora");
    let mut model = tiny(&nf4_dq());
    peft_model::load_adapter(&mut model, &dir.join("adapter"), DEFAULT_ADAPTER).unwrap();
    let ours = tch::no_grad(|| model.forward(&ids));
    let (d, scale) = diff(&ours, &read(&dir.join("logits.safetensors"))["logits"]);
    eprintln!("tiny nf4_dq + LoRA: max |logit diff| {d:.3e} (max |logit| {scale:.2})");
    assert!(d < LOGIT_TOL, "{d}");
}

/// Merging for decoding (what generate and eval do on CUDA, and with
/// `--merge-for-decoding always` anywhere) keeps the adapter of a 4-bit base:
/// its layers stay unmerged, so the logits are the unmerged adapter's, far
/// from the base model's. Merging into the 4-bit weights, as PEFT's
/// `merge_and_unload` does, would round most of the update away.
#[test]
fn merging_for_decoding_keeps_the_adapter_of_a_4bit_base() {
    use peft_model::MergeForDecoding;
    assert!(MergeForDecoding::Auto.merges(true) && !MergeForDecoding::Auto.merges(false));
    assert!(MergeForDecoding::Always.merges(false) && !MergeForDecoding::Never.merges(true));
    let ids = read(&fx().join("batch.safetensors"))["input_ids"].shallow_clone();
    let dir = fx().join("tiny").join("lora");
    let mut model = tiny(&nf4_dq());
    peft_model::load_adapter(&mut model, &dir.join("adapter"), DEFAULT_ADAPTER).unwrap();
    let unmerged = tch::no_grad(|| model.forward(&ids));
    let (merged, kept) = peft_model::merge_for_decoding(&mut model).unwrap();
    let after = tch::no_grad(|| model.forward(&ids));
    let base = tch::no_grad(|| tiny(&nf4_dq()).forward(&ids));
    let (d, _) = diff(&after, &unmerged);
    let (from_base, _) = diff(&unmerged, &base);
    eprintln!(
        "merge for decoding on nf4: {merged} merged, {kept} kept unmerged; vs unmerged {d:.3e}, adapter's effect {from_base:.3e}"
    );
    assert_eq!((merged, kept), (0, 14), "every adapted layer is 4-bit");
    assert!(d < LOGIT_TOL, "{d}");
    assert!(
        from_base > 100.0 * LOGIT_TOL,
        "the adapter changes nothing: {from_base}"
    );
    // PEFT's merge into the 4-bit weights (quantize W + ΔW again) loses it.
    let mut requantized = tiny(&nf4_dq());
    peft_model::load_adapter(&mut requantized, &dir.join("adapter"), DEFAULT_ADAPTER).unwrap();
    peft_model::merge(&mut requantized).unwrap();
    let (lost, _) = diff(&tch::no_grad(|| requantized.forward(&ids)), &unmerged);
    eprintln!("  re-quantized merge instead: {lost:.3e} from the unmerged logits");
    assert!(lost > 10.0 * LOGIT_TOL, "{lost}");
    // A dense base merges.
    let mut dense = load_tiny();
    peft_model::load_adapter(&mut dense, &dir.join("adapter"), DEFAULT_ADAPTER).unwrap();
    let before = tch::no_grad(|| dense.forward(&ids));
    assert_eq!(peft_model::merge_for_decoding(&mut dense).unwrap(), (14, 0));
    let (d, _) = diff(&tch::no_grad(|| dense.forward(&ids)), &before);
    assert!(d < LOGIT_TOL, "dense merge: {d}");
}

fn grads(variant: &str, gradient_checkpointing: bool) -> (HashMap<String, Tensor>, f64) {
    let mut model = tiny(&nf4_dq());
    let dir = fx().join("tiny").join(variant).join("adapter");
    peft_model::load_adapter(&mut model, &dir, DEFAULT_ADAPTER).unwrap();
    let opts = StepOptions {
        checkpointing: Checkpointing::new(gradient_checkpointing, KeptProducts::default()),
        loss_chunk_size: 7,
        router_aux_loss_coef: None,
    };
    common::one_step_grads(
        &mut model,
        &fixture_batch(),
        opts,
        &mut RegularizerStack::new(),
    )
}

#[test]
fn adapter_gradients_on_4bit_base_match_peft() {
    for variant in ["lora", "dora"] {
        let dir = fx().join("tiny").join(variant);
        let (ours, loss) = grads(variant, false);
        let theirs = read(&dir.join("grads.safetensors"));
        let ref_loss = ref_loss(&dir);
        assert!(
            (loss - ref_loss).abs() < 1e-5 * ref_loss.abs(),
            "{variant}: loss {loss} vs {ref_loss}"
        );
        assert_eq!(ours.len(), theirs.len(), "{variant}");
        let mut worst: f64 = 0.0;
        for (k, g) in &theirs {
            let o = ours
                .get(k)
                .unwrap_or_else(|| panic!("{variant}: no gradient for {k}"));
            let (d, scale) = diff(o, g);
            assert!(scale > 0.0, "{variant}: {k} has zero reference gradient");
            worst = worst.max(d / scale);
        }
        eprintln!(
            "{variant} on nf4_dq: loss {loss:.6} (PEFT {ref_loss:.6}), worst relative gradient error {worst:.2e}"
        );
        assert!(worst < 1e-3, "{variant}: {worst}");
        // Gradient checkpointing recomputes the dequantized weights layer by
        // layer and gives the same gradients.
        let (ckpt, l2) = grads(variant, true);
        assert_eq!(loss, l2, "{variant}");
        for (k, g) in &ours {
            assert!(
                g.equal(&ckpt[k]),
                "{variant}: {k} differs with checkpointing"
            );
        }
    }
}

/// The logits of one prompt's tokens, every position.
fn logits_of(model: &LlamaForCausalLM, ids: &[u32]) -> Tensor {
    let t = Tensor::from_slice(&ids.iter().map(|&x| x as i64).collect::<Vec<_>>()).unsqueeze(0);
    tch::no_grad(|| model.forward(&t)).squeeze_dim(0)
}

#[test]
fn smollm2_nf4_logits_and_greedy_generation_match_bitsandbytes() {
    let dir = fx().join("smollm2");
    let prompts: Vec<String> = read_json(&dir.join("prompts.json"));
    let want_gen: Vec<Vec<i64>> = read_json(&dir.join("generate.json"));
    let logits = read(&dir.join("logits.safetensors"));
    let mut base = Pretrained::load_quantized(
        &common::default_model(),
        Kind::Float,
        Device::Cpu,
        Some(&nf4_dq()),
    )
    .unwrap();
    // Frozen bytes of the quantized linear layers per parameter.
    let (mut bytes, mut params) = (0usize, 0i64);
    for (path, lin) in base.model.linear_layers_mut() {
        if lin.weight.is_quantized() {
            bytes += lin.weight.frozen_bytes();
            params += lin.weight.numel();
        } else {
            assert_eq!(path, "lm_head", "only the output head stays dense");
        }
    }
    let per_param = bytes as f64 / params as f64;
    eprintln!("SmolLM2 nf4 + double quant: {bytes} frozen bytes for {params} linear weights = {per_param:.4} bytes/param");
    assert!((0.50..0.54).contains(&per_param), "{per_param}");
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| base.tokenizer.encode(p, true).unwrap())
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        eos_token_ids: base.eos_token_ids.clone(),
        ..GenerationConfig::default()
    };
    let mut same = 0;
    let mut worst: f64 = 0.0;
    for (i, p) in ids.iter().enumerate() {
        let ours = logits_of(&base.model, p);
        let (d, _) = diff(&ours, &logits[&format!("p{i}")]);
        worst = worst.max(d);
        let got = generate(&base.model, p, &cfg).unwrap();
        if got == want_gen[i] {
            same += 1;
        } else {
            eprintln!(
                "prompt {i}: ours {got:?}\n          bitsandbytes {:?}",
                want_gen[i]
            );
        }
    }
    eprintln!("SmolLM2 nf4_dq: max |logit diff| {worst:.3e}; greedy generation identical on {same}/{} prompts", ids.len());
    assert!(worst < LOGIT_TOL, "{worst}");
    assert!(2 * same > ids.len(), "{same}/{}", ids.len());
    peft_model::load_adapter(&mut base.model, &dir.join("adapter"), DEFAULT_ADAPTER).unwrap();
    let mut worst: f64 = 0.0;
    for (i, p) in ids.iter().enumerate() {
        let ours = logits_of(&base.model, p);
        let (d, _) = diff(&ours, &logits[&format!("adapter_p{i}")]);
        worst = worst.max(d);
    }
    eprintln!("SmolLM2 nf4_dq + PEFT LoRA: max |logit diff| {worst:.3e}");
    assert!(worst < LOGIT_TOL, "{worst}");
}

#[test]
fn merge_into_prequantized_base_matches_peft_before_requantization() {
    let fx = common::qlora_merge_reference();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = peft_rs::merge::merge_to_dir(&peft_rs::merge::MergeOptions {
        base: fx.join("base4"),
        adapters: vec![fx.join("adapter")],
        weights: vec![],
        output: out.clone(),
        dtype: None,
        overwrite: false,
        progress: false,
    })
    .unwrap();
    let want = read(&fx.join("merged.safetensors"));
    let requant = read(&fx.join("requantized.safetensors"));
    assert_eq!(report.tensors_merged, want.len());
    let got = read(&out.join("model.safetensors"));
    assert!(
        got.keys()
            .all(|k| !k.contains("absmax") && !k.contains("quant_")),
        "quant state left in the merged model"
    );
    let (mut worst, mut requant_err): (f64, f64) = (0.0, 0.0);
    for (k, w) in &want {
        let g = &got[k];
        assert_eq!(g.kind(), Kind::Float, "{k}");
        let (d, scale) = diff(g, w);
        worst = worst.max(d / scale);
        let (r, _) = diff(&requant[k], w);
        requant_err = requant_err.max(r / scale);
    }
    eprintln!(
        "merge into nf4_dq base: worst relative error vs PEFT's dequantize + delta {worst:.2e}; \
         PEFT's re-quantized merge is {requant_err:.2e} away from it"
    );
    // Both add the same fp32 delta to the same dequantized weight; the delta
    // (B @ A * scaling) may be summed in another order.
    assert!(worst < 1e-6, "{worst}");
    let cfg: serde_json::Value = read_json(&out.join("config.json"));
    assert!(cfg.get("quantization_config").is_none());
    // The merged model loads as a plain model and gives the adapted 4-bit
    // model's logits up to the merge's rounding.
    let ids = read(&fixture_batch())["input_ids"].shallow_clone();
    let merged = common::load(&out);
    let mut adapted = common::load(&fx.join("base4"));
    peft_model::load_adapter(&mut adapted, &fx.join("adapter"), DEFAULT_ADAPTER).unwrap();
    let (d, scale) = diff(
        &tch::no_grad(|| merged.forward(&ids)),
        &tch::no_grad(|| adapted.forward(&ids)),
    );
    eprintln!("merged vs adapted 4-bit logits: {d:.2e} (max |logit| {scale:.2})");
    assert!(d < LOGIT_TOL, "{d}");
}

fn fixture_batch() -> PathBuf {
    fx().join("batch.safetensors")
}

/// Logits `peft_reference.py logits` computes with Python PEFT for `adapter`
/// on the tiny base, quantized by bitsandbytes when `quant` says so.
fn tiny_peft_logits(adapter: &Path, quant: Option<&str>) -> Tensor {
    peft_logits(&common::tiny(), &fixture_batch(), Some(adapter), quant)
}

/// The other direction: an adapter trained by peft-rs on a 4-bit base is an
/// ordinary PEFT adapter. Python PEFT loads it (every key and value as
/// stored, checked by the script) on a bitsandbytes 4-bit base and on the
/// unquantized base, and computes what peft-rs computes on each.
#[test]
fn adapter_trained_on_4bit_base_loads_in_peft_on_4bit_and_full_bases() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 12);
    let out = tmp.path().join("run");
    common::Cmd::train_tiny("train", &data, &out)
        .args("--device cpu --quantize nf4 --bnb-4bit-use-double-quant --max-steps 3 --lr 1e-2")
        .args("--lora-rank 4 --max-seq-len 48")
        .run_ok();
    let batch = read(&fixture_batch());
    let (ids, mask) = (&batch["input_ids"], &batch["attention_mask"]);
    let masked = |t: &Tensor| t.masked_fill(&mask.eq(0).unsqueeze(-1), 0.0);
    let logits = |mut m: LlamaForCausalLM, adapter: bool| {
        if adapter {
            peft_model::load_adapter(&mut m, &out, DEFAULT_ADAPTER).unwrap();
        }
        masked(&tch::no_grad(|| m.forward(ids)))
    };
    let dense = load_tiny;
    for (name, ours, plain, theirs) in [
        (
            "nf4 + double quant",
            logits(tiny(&nf4_dq()), true),
            logits(tiny(&nf4_dq()), false),
            tiny_peft_logits(&out, Some("nf4")),
        ),
        (
            "unquantized",
            logits(dense(), true),
            logits(dense(), false),
            tiny_peft_logits(&out, None),
        ),
    ] {
        let (d, scale) = diff(&ours, &masked(&theirs));
        let (effect, _) = diff(&ours, &plain);
        eprintln!("peft-rs adapter (4-bit trained) in PEFT on the {name} base: max |logit diff| {d:.2e} (adapter effect {effect:.2e}, max |logit| {scale:.2})");
        assert!(
            effect > 100.0 * LOGIT_TOL,
            "{name}: the trained adapter changes nothing ({effect})"
        );
        assert!(d < LOGIT_TOL, "{name}: {d}");
    }
}

/// QLoRA on a mixture of experts as transformers + bitsandbytes + PEFT run
/// it (`tests/fixtures/qlora_moe_reference.py`, the tiny Qwen3-MoE of
/// `arch_reference.py`): `--quantize nf4` makes the linear layers 4-bit
/// (attention, the dense layer's MLP) and keeps the router and the 3D
/// experts dense, as bitsandbytes leaves what is not `nn.Linear`; the 4-bit
/// model's logits, PEFT's all-linear adapter on it (attention, router,
/// experts) and one step's gradients.
#[test]
fn moe_4bit_base_and_expert_adapters_match_bitsandbytes_and_peft() {
    let moe = common::arch_reference().join("models/qwen3_moe");
    let fx = common::fixture("qlora_moe_reference.py", &[], &[&moe]);
    let batch = fx.join("batch.safetensors");
    let ids = read(&batch)["input_ids"].shallow_clone();
    let load = || models::load_quantized(&moe, Kind::Float, Device::Cpu, Some(&nf4_dq())).unwrap();
    let model = load();
    // Exactly the linear modules are 4-bit: every one but lm_head.
    let linear: i64 = model
        .config
        .linear_modules()
        .iter()
        .filter(|(p, _, _)| p != models::OUTPUT_HEAD)
        .map(|(_, i, o)| i * o)
        .sum();
    assert_eq!(model.frozen_bytes().2, linear, "quantized parameters");
    let (d, scale) = diff(
        &tch::no_grad(|| model.forward(&ids)),
        &read(&fx.join("logits.safetensors"))["logits"],
    );
    eprintln!("qwen3_moe nf4_dq: max |logit diff| {d:.3e} (max |logit| {scale:.2})");
    assert!(d < LOGIT_TOL, "{d}");

    let dir = fx.join("experts");
    let mut model = load();
    peft_model::load_adapter(&mut model, &dir.join("adapter"), DEFAULT_ADAPTER).unwrap();
    let (d, _) = diff(
        &tch::no_grad(|| model.forward(&ids)),
        &read(&dir.join("logits.safetensors"))["logits"],
    );
    eprintln!(
        "qwen3_moe nf4_dq with PEFT's all-linear adapter (attention, router, experts): {d:.3e}"
    );
    assert!(d < LOGIT_TOL, "adapter: {d}");
    let opts = StepOptions {
        checkpointing: Checkpointing::Off,
        loss_chunk_size: 7,
        router_aux_loss_coef: None,
    };
    let (ours, loss) =
        common::one_step_grads(&mut model, &batch, opts, &mut RegularizerStack::new());
    let theirs = read(&dir.join("grads.safetensors"));
    let ref_loss = ref_loss(&dir);
    assert!(
        (loss - ref_loss).abs() < 1e-5 * ref_loss.abs(),
        "loss {loss} vs {ref_loss}"
    );
    assert_eq!(ours.len(), theirs.len());
    assert!(
        theirs.keys().any(|k| k.contains("mlp.experts.")),
        "experts adapted"
    );
    let mut worst: f64 = 0.0;
    for (k, g) in &theirs {
        let (d, scale) = diff(&ours[k], g);
        assert!(scale > 0.0, "{k} has zero reference gradient");
        worst = worst.max(d / scale);
    }
    eprintln!("qwen3_moe nf4_dq all-linear: loss {loss:.6} (PEFT {ref_loss:.6}), worst relative gradient error {worst:.2e}");
    assert!(worst < 1e-3, "{worst}");
}
