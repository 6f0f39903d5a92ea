//! Packing: several examples in one row, each with its own positions and
//! attention confined to itself, compute what the same examples compute
//! unpacked — logits, loss and gradients — and NEFTune sees each example's
//! own length.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use peft_rs::data::{collate, load_dataset, pack, DataOptions, Example};
use peft_rs::models::{self, Checkpointing, Pretrained};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::NoHooks;
use peft_rs::regularizers::{HookContext, HookPoint, Neftune, Regularizer, RegularizerStack};
use peft_rs::train::{forward_backward, MicroBatch, StepOptions};
use tch::{Device, Kind, Tensor};

fn examples(n: usize) -> Vec<Example> {
    let tmp = tempfile::tempdir().unwrap();
    let p = common::alpaca(tmp.path(), n);
    let base = Pretrained::load(&common::tiny(), Kind::Float, Device::Cpu).unwrap();
    let opts = DataOptions {
        format: None,
        max_seq_len: 80,
        train_on_prompt: false,
    };
    load_dataset(&p, &base.tokenizer, base.completion_eos().unwrap(), &opts)
        .unwrap()
        .examples
}

/// The tiny model with a PEFT LoRA adapter whose B is not zero.
fn model() -> models::LlamaForCausalLM {
    let fx = common::grad_reference();
    let mut m = common::load_tiny();
    peft_model::load_adapter(&mut m, &fx.join("lora").join("adapter"), DEFAULT_ADAPTER).unwrap();
    m
}

/// Records whether the regularizer context carried segment ids.
struct SeesSegments(Arc<Mutex<Vec<bool>>>);

impl Regularizer for SeesSegments {
    fn name(&self) -> String {
        "sees-segments".into()
    }
    fn hook_points(&self) -> Vec<HookPoint> {
        vec![HookPoint::EmbeddingOutput]
    }
    fn apply(&mut self, _: HookPoint, x: Tensor, ctx: &HookContext) -> Tensor {
        self.0.lock().unwrap().push(ctx.segment_ids.is_some());
        x
    }
}

fn grads_and_loss(
    m: &mut models::LlamaForCausalLM,
    batch: &peft_rs::data::Batch,
    regs: &mut RegularizerStack,
) -> (HashMap<String, Tensor>, f64) {
    peft_model::set_training(m, true);
    let (params, trainable) = common::trainable(m);
    for p in params.values() {
        p.shallow_clone().zero_grad();
    }
    let mb = MicroBatch {
        seed: 3,
        ..MicroBatch::single(0, batch.num_label_tokens as f64, 1.0)
    };
    let opts = StepOptions {
        checkpointing: Checkpointing::Off,
        loss_chunk_size: 1024,
        router_aux_loss_coef: None,
    };
    let loss = forward_backward(m, regs, &trainable, batch, &mb, opts).unwrap();
    let grads = params
        .iter()
        .map(|(k, t)| (k.clone(), t.grad().copy()))
        .collect();
    (grads, loss)
}

#[test]
fn a_packed_row_computes_what_its_examples_compute_apart() {
    let ex = examples(6);
    let refs: Vec<&Example> = ex.iter().collect();
    let total: usize = ex.iter().map(|e| e.input_ids.len()).sum();
    let packed = pack(ex.clone(), total);
    assert_eq!(packed.len(), 1, "all six fit in one row");
    let row = &packed[0];
    let pad = 2;
    let unpacked = collate(&refs, pad);
    let packed_batch = collate(&[row], pad);
    assert_eq!(packed_batch.num_label_tokens, unpacked.num_label_tokens);

    let mut m = model();
    // Logits: each packed segment against its example on its own.
    let _g = tch::no_grad_guard();
    let seg = packed_batch.segment_ids.as_ref().unwrap();
    let packed_logits = m.logits(&m.forward_hidden(
        &packed_batch.decoder_input(&packed_batch.input_ids, Some(seg)),
        None,
        &mut NoHooks,
    ));
    let apart_logits = m.forward(&unpacked.input_ids);
    drop(_g);
    let mut worst: f64 = 0.0;
    let mut offset = 0i64;
    for &len in &row.segments {
        let len = len as i64;
        // Which unpacked example has this segment's tokens.
        let tokens = packed_batch.input_ids.get(0).narrow(0, offset, len);
        let i = (0..ex.len())
            .find(|&i| {
                ex[i].input_ids.len() as i64 == len
                    && unpacked
                        .input_ids
                        .get(i as i64)
                        .narrow(0, 0, len)
                        .equal(&tokens)
            })
            .expect("each segment is one of the examples");
        let a = packed_logits.get(0).narrow(0, offset, len);
        let b = apart_logits.get(i as i64).narrow(0, 0, len);
        worst = worst.max((a - b).abs().max().double_value(&[]));
        offset += len;
    }
    eprintln!("packed vs apart: max logit difference {worst:.2e}");
    assert!(worst < 1e-5, "logits differ by {worst}");

    // Loss and gradients, with NEFTune off (its noise is drawn per batch shape).
    let (g_apart, l_apart) = grads_and_loss(&mut m, &unpacked, &mut RegularizerStack::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut regs = RegularizerStack::new();
    regs.push(Box::new(SeesSegments(seen.clone())));
    let (g_packed, l_packed) = grads_and_loss(&mut m, &packed_batch, &mut regs);
    assert!(
        (l_apart - l_packed).abs() < 1e-5 * l_apart,
        "loss {l_apart} vs {l_packed}"
    );
    let mut worst_g: f64 = 0.0;
    for (k, g) in &g_apart {
        let scale = g.abs().max().double_value(&[]).max(1e-12);
        worst_g = worst_g.max((g - &g_packed[k]).abs().max().double_value(&[]) / scale);
    }
    eprintln!("packed vs apart: loss {l_packed:.6} vs {l_apart:.6}, worst relative gradient difference {worst_g:.2e}");
    assert!(worst_g < 1e-5, "gradients differ by {worst_g}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![true],
        "regularizers see the segments"
    );

    // NEFTune in paper mode scales each packed example by its own length.
    let mut n = Neftune::new(5.0);
    let emb = Tensor::zeros(
        [1, row.input_ids.len() as i64, 64],
        (Kind::Float, Device::Cpu),
    );
    let mask = packed_batch.attention_mask.shallow_clone();
    let ctx = HookContext {
        segment_ids: Some(seg),
        ..common::hook_context(&mask, true, 9)
    };
    let noise = n.apply(HookPoint::EmbeddingOutput, emb, &ctx);
    let mut offset = 0i64;
    for &len in &row.segments {
        let bound = 5.0 / ((len * 64) as f64).sqrt();
        let max = noise
            .get(0)
            .narrow(0, offset, len as i64)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            max <= bound * (1.0 + 1e-6) && max > 0.8 * bound,
            "segment of {len}: {max} vs {bound}"
        );
        offset += len as i64;
    }
}

#[test]
fn packing_fills_rows_best_fit_decreasing() {
    let ex = examples(40);
    let lengths: Vec<usize> = ex.iter().map(|e| e.input_ids.len()).collect();
    let rows = pack(ex.clone(), 160);
    let mut seen: Vec<usize> = rows.iter().flat_map(|r| r.segments.clone()).collect();
    let mut want = lengths.clone();
    seen.sort();
    want.sort();
    assert_eq!(seen, want, "every example is packed exactly once");
    for r in &rows {
        assert!(r.input_ids.len() <= 160);
        assert_eq!(r.input_ids.len(), r.segments.iter().sum::<usize>());
    }
    let lower_bound = lengths.iter().sum::<usize>().div_ceil(160);
    eprintln!(
        "{} examples in {} rows (at least {lower_bound})",
        ex.len(),
        rows.len()
    );
    assert!(rows.len() <= lower_bound + 2, "best fit wastes little room");
}
