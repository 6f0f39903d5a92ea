//! One training step's adapter gradients against Python PEFT + transformers
//! (same tiny model, batch, masked labels; NEFTune and dropout off), and
//! gradient checkpointing giving exactly the same gradients.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{edit_json, grad_reference as fx, ref_loss, tensors as read};
use peft_rs::models::{self, Checkpointing, DecoderInput};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::{Neftune, NoHooks, RegularizerStack};
use peft_rs::train::StepOptions;
use tch::{Device, Kind, Tensor};

/// Our gradients for `variant`, by adapter key, and the loss.
fn our_grads(variant: &str, opts: StepOptions) -> (HashMap<String, Tensor>, f64) {
    grads_with(
        &fx().join(variant).join("adapter"),
        Kind::Float,
        opts,
        RegularizerStack::new(),
    )
}

/// Our gradients for the adapter in `adapter_dir` on the tiny base in `kind`.
fn grads_with(
    adapter_dir: &Path,
    kind: Kind,
    opts: StepOptions,
    mut regs: RegularizerStack,
) -> (HashMap<String, Tensor>, f64) {
    let mut model = models::load(&common::tiny(), kind, Device::Cpu).unwrap();
    peft_model::load_adapter(&mut model, adapter_dir, DEFAULT_ADAPTER).unwrap();
    common::one_step_grads(&mut model, &fx().join("batch.safetensors"), opts, &mut regs)
}

const PLAIN: StepOptions = StepOptions {
    checkpointing: Checkpointing::Off,
    loss_chunk_size: 7,
    router_aux_loss_coef: None,
};

#[test]
fn adapter_gradients_match_peft() {
    for variant in ["lora", "dora"] {
        let (ours, loss) = our_grads(variant, PLAIN);
        let theirs = read(&fx().join(variant).join("grads.safetensors"));
        let ref_loss = ref_loss(&fx().join(variant));
        assert!(
            (loss - ref_loss).abs() < 1e-5 * ref_loss.abs(),
            "{variant}: loss {loss} vs {ref_loss}"
        );
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{variant}: same set of trainable tensors"
        );
        let mut worst: f64 = 0.0;
        for (k, g) in &theirs {
            let o = ours
                .get(k)
                .unwrap_or_else(|| panic!("{variant}: no gradient for {k}"));
            let scale = g.abs().max().double_value(&[]);
            assert!(scale > 0.0, "{variant}: {k} has zero reference gradient");
            let rel = (o - g).abs().max().double_value(&[]) / scale;
            worst = worst.max(rel);
            assert!(rel < 1e-4, "{variant}: {k}: relative error {rel}");
        }
        eprintln!("{variant}: loss {loss:.6} (PEFT {ref_loss:.6}), worst relative gradient error {worst:.2e}");
    }
}

#[test]
fn gradient_checkpointing_gives_identical_gradients() {
    for variant in ["lora", "dora"] {
        let (plain, l1) = our_grads(variant, PLAIN);
        // Also when frozen products are kept and replayed.
        for checkpointing in common::every_checkpointing() {
            let (ckpt, l2) = our_grads(
                variant,
                StepOptions {
                    checkpointing,
                    ..PLAIN
                },
            );
            assert_eq!(l1, l2);
            for (k, g) in &plain {
                assert!(
                    g.equal(&ckpt[k]),
                    "{variant}: {k} differs with {checkpointing:?}"
                );
            }
        }
    }
}

/// Checkpointing keeps what it is asked to, no more: per token and layer,
/// the q, k, v and o products (`q + 2 kv + hidden` values) and the gate and
/// up products (`2 intermediate`), in the base's dtype.
#[test]
fn checkpointing_keeps_the_frozen_products_it_is_asked_for() {
    for kind in [Kind::Float, Kind::BFloat16] {
        let model = models::load(&common::tiny(), kind, Device::Cpu).unwrap();
        let c = &model.config;
        let ids = Tensor::arange(14, (Kind::Int64, Device::Cpu)).view([2, 7]);
        let per_token_layer = |values: usize| {
            (14 * c.num_hidden_layers * values) as i64 * kind.elt_size_in_bytes() as i64
        };
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        for checkpointing in common::every_checkpointing() {
            let Checkpointing::On(keep) = checkpointing else {
                unreachable!("every choice checkpoints")
            };
            let out = model.decode(
                &DecoderInput::causal(&ids),
                None,
                &mut NoHooks,
                checkpointing,
            );
            let (attention, mlp) = out.recompute.expect("checkpointed").kept_bytes();
            let want_attention = per_token_layer(q + 2 * kv + c.hidden_size);
            let want_mlp = per_token_layer(2 * c.intermediate_size);
            assert_eq!(
                attention,
                if keep.attention { want_attention } else { 0 },
                "{kind:?} {checkpointing:?}"
            );
            assert_eq!(
                mlp,
                if keep.mlp { want_mlp } else { 0 },
                "{kind:?} {checkpointing:?}"
            );
        }
    }
}

/// On a bf16 base, keeping frozen products changes no bit of a
/// checkpointed step's gradients either.
#[test]
fn keeping_frozen_products_gives_identical_gradients_on_a_bf16_base() {
    let dir = fx().join("lora_bf16").join("adapter");
    let run = |opts| grads_with(&dir, Kind::BFloat16, opts, RegularizerStack::new());
    let (plain, l1) = run(PLAIN);
    for checkpointing in common::every_checkpointing() {
        let (kept, l2) = run(StepOptions {
            checkpointing,
            ..PLAIN
        });
        assert_eq!(l1, l2, "{checkpointing:?}");
        for (k, g) in &plain {
            assert!(g.equal(&kept[k]), "{k} differs with {checkpointing:?}");
        }
    }
}

/// Worst relative error over tensors: max |a - b| / max |b|.
fn worst_error(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    b.iter()
        .map(|(k, g)| {
            let o = a.get(k).unwrap_or_else(|| panic!("no gradient for {k}"));
            (o - g).abs().max().double_value(&[]) / g.abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn bf16_base_gradients_match_peft_in_bf16() {
    let dir = fx().join("lora_bf16");
    let (ours, loss) = grads_with(
        &dir.join("adapter"),
        Kind::BFloat16,
        PLAIN,
        RegularizerStack::new(),
    );
    let peft_bf16 = read(&dir.join("grads.safetensors"));
    let peft_fp32 = read(&dir.join("grads_fp32.safetensors"));
    let ref_loss = ref_loss(&dir);
    let ours_vs_peft = worst_error(&ours, &peft_bf16);
    // How far bf16 itself is from exact: PEFT in bf16 against PEFT in fp32.
    let bf16_floor = worst_error(&peft_bf16, &peft_fp32);
    eprintln!(
        "bf16: loss {loss:.6} (PEFT {ref_loss:.6}); worst relative gradient error vs PEFT bf16 {ours_vs_peft:.2e}, \
         PEFT bf16 vs fp32 {bf16_floor:.2e}"
    );
    assert!(
        (loss - ref_loss).abs() < 1e-2 * ref_loss.abs(),
        "loss {loss} vs {ref_loss}"
    );
    // Both compute in bf16 with fp32 adapters; rounding can differ only where
    // kernels accumulate in another order, so we must be closer to PEFT than
    // bf16 is to fp32.
    assert!(
        ours_vs_peft < 0.5 * bf16_floor,
        "ours vs PEFT bf16 {ours_vs_peft} is not well below bf16's own error {bf16_floor}"
    );
}

/// `--lora-compute-dtype bf16` (the default on a bf16 base) is PEFT under
/// transformers' bf16 autocast, as Trainer runs it with `bf16=True`.
#[test]
fn bf16_lora_compute_gradients_match_peft_under_bf16_autocast() {
    let dir = fx().join("lora_bf16");
    let mut model = models::load(&common::tiny(), Kind::BFloat16, Device::Cpu).unwrap();
    peft_model::load_adapter(&mut model, &dir.join("adapter"), DEFAULT_ADAPTER).unwrap();
    peft_model::set_compute_kind(&mut model, Kind::BFloat16);
    let (ours, loss) = common::one_step_grads(
        &mut model,
        &fx().join("batch.safetensors"),
        PLAIN,
        &mut RegularizerStack::new(),
    );
    let autocast = read(&dir.join("grads_autocast.safetensors"));
    let eager = read(&dir.join("grads.safetensors"));
    let fp32 = read(&dir.join("grads_fp32.safetensors"));
    let ref_loss = common::read_json::<serde_json::Value>(&dir.join("loss_autocast.json"))["loss"]
        .as_f64()
        .unwrap();
    let ours_vs_autocast = worst_error(&ours, &autocast);
    let ours_vs_eager = worst_error(&ours, &eager);
    let bf16_floor = worst_error(&autocast, &fp32);
    eprintln!(
        "bf16 LoRA compute: loss {loss:.6} (PEFT autocast {ref_loss:.6}); worst relative gradient error \
         vs PEFT autocast {ours_vs_autocast:.2e}, vs PEFT eager {ours_vs_eager:.2e}, PEFT autocast vs fp32 {bf16_floor:.2e}"
    );
    assert!(
        (loss - ref_loss).abs() < 1e-2 * ref_loss.abs(),
        "loss {loss} vs {ref_loss}"
    );
    assert!(
        ours_vs_autocast < 0.5 * bf16_floor,
        "ours vs PEFT under autocast {ours_vs_autocast} is not well below bf16's own error {bf16_floor}"
    );
    // And it is autocast's arithmetic that is followed, not PEFT's eager one.
    assert!(
        ours_vs_autocast < ours_vs_eager,
        "closer to PEFT eager ({ours_vs_eager}) than under autocast ({ours_vs_autocast})"
    );
}

#[test]
fn gradient_checkpointing_with_dropout_and_neftune_gives_identical_gradients() {
    // The PEFT adapter with dropout 0.1 on every module.
    let tmp = tempfile::tempdir().unwrap();
    let src = fx().join("lora").join("adapter");
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    edit_json(&tmp.path().join("adapter_config.json"), |c| {
        c["lora_dropout"] = serde_json::json!(0.1)
    });
    let regs = || {
        let mut r = RegularizerStack::new();
        r.push(Box::new(Neftune::new(5.0)));
        r
    };
    let (plain, l1) = grads_with(tmp.path(), Kind::Float, PLAIN, regs());
    for checkpointing in common::every_checkpointing() {
        let (ckpt, l2) = grads_with(
            tmp.path(),
            Kind::Float,
            StepOptions {
                checkpointing,
                ..PLAIN
            },
            regs(),
        );
        assert_eq!(l1, l2, "same loss with checkpointing");
        for (k, g) in &plain {
            assert!(g.equal(&ckpt[k]), "{k} differs with {checkpointing:?}");
        }
    }
    let (no_noise, _) = grads_with(tmp.path(), Kind::Float, PLAIN, RegularizerStack::new());
    // The test has teeth: the dropout and the noise do change the gradients.
    let (clean, _) = our_grads("lora", PLAIN);
    assert!(
        worst_error(&no_noise, &clean) > 1e-3,
        "dropout changes the gradients"
    );
    assert!(
        worst_error(&plain, &no_noise) > 1e-3,
        "NEFTune changes the gradients"
    );
}

/// Squashes a decoder layer's output (a regularizer that reads its value).
struct Squash(usize);

impl peft_rs::regularizers::Regularizer for Squash {
    fn name(&self) -> String {
        "squash".into()
    }
    fn hook_points(&self) -> Vec<peft_rs::regularizers::HookPoint> {
        vec![peft_rs::regularizers::HookPoint::DecoderLayerOutput(self.0)]
    }
    fn apply(
        &mut self,
        _point: peft_rs::regularizers::HookPoint,
        value: Tensor,
        _ctx: &peft_rs::regularizers::HookContext,
    ) -> Tensor {
        value.tanh()
    }
}

/// A recomputed layer skips its output's value (the MLP's last frozen
/// product) only where no hook reads it: with a hook that does, the
/// gradients are still those of the plain pass, and different from those
/// without the hook.
#[test]
fn gradient_checkpointing_with_a_hook_reading_a_layer_output_gives_identical_gradients() {
    let dir = fx().join("lora").join("adapter");
    let squash = || {
        let mut r = RegularizerStack::new();
        r.push(Box::new(Squash(0)));
        r
    };
    let (plain, l1) = grads_with(&dir, Kind::Float, PLAIN, squash());
    for checkpointing in common::every_checkpointing() {
        let ckpt = StepOptions {
            checkpointing,
            ..PLAIN
        };
        let (recomputed, l2) = grads_with(&dir, Kind::Float, ckpt, squash());
        assert_eq!(l1, l2, "same loss with checkpointing");
        for (k, g) in &plain {
            assert!(
                g.equal(&recomputed[k]),
                "{k} differs with {checkpointing:?}"
            );
        }
    }
    let (clean, _) = grads_with(&dir, Kind::Float, PLAIN, RegularizerStack::new());
    assert!(
        worst_error(&plain, &clean) > 1e-3,
        "the hook changes the gradients"
    );
}
