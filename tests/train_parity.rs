//! One training step's adapter gradients against Python PEFT + transformers
//! (same tiny model, batch, masked labels; NEFTune and dropout off), and
//! gradient checkpointing giving exactly the same gradients.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use peft_rs::data::Batch;
use peft_rs::models;
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::RegularizerStack;
use peft_rs::train::{forward_backward, MicroBatch, StepOptions};
use tch::{Device, Kind, Tensor};

fn fx() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::fixture("grad_reference.py", &[], &[&common::model_dir("llama")]))
}

fn read(p: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(p).unwrap().into_iter().collect()
}

/// Our gradients for `variant`, by adapter key, and the loss.
fn our_grads(variant: &str, opts: StepOptions) -> (HashMap<String, Tensor>, f64) {
    let mut model = models::load(&common::model_dir("llama"), Kind::Float, Device::Cpu).unwrap();
    peft_model::load_adapter(
        &mut model,
        &fx().join(variant).join("adapter"),
        DEFAULT_ADAPTER,
    )
    .unwrap();
    peft_model::set_training(&mut model, true);
    let params = peft_model::trainable_parameters(&mut model);
    let trainable: Vec<(String, Tensor)> = params
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let b = read(&fx().join("batch.safetensors"));
    let labels = b["labels"].shallow_clone();
    let batch = Batch {
        input_ids: b["input_ids"].shallow_clone(),
        attention_mask: b["attention_mask"].shallow_clone(),
        num_tokens: b["attention_mask"].sum(Kind::Int64).int64_value(&[]),
        // Tokens that are predicted: a label at position i+1 for i in 0..T-1.
        num_label_tokens: labels
            .narrow(1, 1, labels.size()[1] - 1)
            .ne(-100)
            .sum(Kind::Int64)
            .int64_value(&[]),
        labels,
    };
    let mut regs = RegularizerStack::new();
    let mb = MicroBatch {
        step: 0,
        index: 0,
        count: 1,
        seed: 1,
        denom: batch.num_label_tokens as f64,
        loss_scale: 1.0,
    };
    let loss = forward_backward(&model, &mut regs, &trainable, &batch, &mb, opts).unwrap();
    (
        params
            .iter()
            .map(|(k, t)| (k.clone(), t.grad().copy()))
            .collect(),
        loss,
    )
}

const PLAIN: StepOptions = StepOptions {
    gradient_checkpointing: false,
    loss_chunk_size: 7,
};

#[test]
fn adapter_gradients_match_peft() {
    for variant in ["lora", "dora"] {
        let (ours, loss) = our_grads(variant, PLAIN);
        let theirs = read(&fx().join(variant).join("grads.safetensors"));
        let ref_loss: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fx().join(variant).join("loss.json")).unwrap(),
        )
        .unwrap();
        let ref_loss = ref_loss["loss"].as_f64().unwrap();
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
        let (ckpt, l2) = our_grads(
            variant,
            StepOptions {
                gradient_checkpointing: true,
                ..PLAIN
            },
        );
        assert_eq!(l1, l2);
        for (k, g) in &plain {
            assert!(
                g.equal(&ckpt[k]),
                "{variant}: {k} differs with checkpointing"
            );
        }
    }
}
