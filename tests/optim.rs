//! The optimizer, clipping and learning-rate schedules against torch's
//! `AdamW`, `clip_grad_norm_` and transformers' `get_scheduler`, on a few
//! tensors (`tests/fixtures/optim_reference.py`).

mod common;

use std::collections::{BTreeMap, HashMap};

use peft_rs::train::optim::{clip_grad_norm, lr_at, AdamW};
use peft_rs::train::Schedule;
use serde_json::Value;
use tch::{Kind, Tensor};

fn reference() -> (HashMap<String, Tensor>, Value) {
    let dir = common::fixture("optim_reference.py", &[], &[]);
    let t = common::tensors(&dir.join("optim.safetensors"));
    (t, common::read_json(&dir.join("optim.json")))
}

#[test]
fn adamw_with_clipping_and_a_linear_schedule_matches_torch() {
    let (t, j) = reference();
    let s = &j["settings"];
    let f = |k: &str| s[k].as_f64().unwrap();
    let params: BTreeMap<String, Tensor> = (0..3)
        .map(|i| {
            let p = t[&format!("p{i}")].copy().set_requires_grad(true);
            (format!("p{i}"), p)
        })
        .collect();
    let mut opt = AdamW::new(
        &params,
        (
            s["betas"][0].as_f64().unwrap(),
            s["betas"][1].as_f64().unwrap(),
        ),
        f("eps"),
        f("weight_decay"),
    );
    let total = s["total"].as_u64().unwrap();
    let warmup = s["warmup"].as_u64().unwrap();
    for step in 0..total {
        for (i, p) in params.values().enumerate() {
            p.shallow_clone().zero_grad();
            // d/dp sum(p * g) = g
            (p * &t[&format!("g{step}_{i}")])
                .sum(Kind::Float)
                .backward();
        }
        let norm = clip_grad_norm(&params, f("max_grad_norm"));
        let want_norm = j["norms"][step as usize].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() <= 1e-5 * want_norm,
            "step {step}: norm {norm} vs torch {want_norm}"
        );
        let lr = lr_at(Schedule::Linear, f("lr"), step, warmup, total);
        let want_lr = j["lrs"][step as usize].as_f64().unwrap();
        assert!(
            (lr - want_lr).abs() <= 1e-12,
            "step {step}: lr {lr} vs {want_lr}"
        );
        opt.step(&params, lr);
        for (i, p) in params.values().enumerate() {
            let want = &t[&format!("after{step}_{i}")];
            let err = (p - want).abs().max().double_value(&[]);
            assert!(
                err < 1e-6,
                "step {step}, p{i}: max difference {err} from torch"
            );
        }
    }
}

#[test]
fn schedules_match_transformers() {
    let (_, j) = reference();
    for (name, schedule) in [
        ("linear", Schedule::Linear),
        ("cosine", Schedule::Cosine),
        ("constant", Schedule::Constant),
        ("constant_with_warmup", Schedule::ConstantWithWarmup),
    ] {
        let want: Vec<f64> = j["schedules"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let ours: Vec<f64> = (0..12).map(|s| lr_at(schedule, 1e-3, s, 3, 12)).collect();
        for (s, (a, b)) in ours.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() < 1e-12,
                "{name}, step {s}: {a} vs transformers {b}"
            );
        }
    }
}

/// LoRA+ against PEFT's `create_loraplus_optimizer`: the learning rate of
/// every adapter tensor (LoRA and DoRA), and three AdamW steps from the same
/// gradients.
#[test]
fn loraplus_groups_and_steps_match_peft() {
    let fx = common::fixture("loraplus_reference.py", &[], &[&common::tiny()]);
    let s: Value = common::read_json(&fx.join("settings.json"));
    let f = |k: &str| s[k].as_f64().unwrap();
    for variant in ["lora", "dora"] {
        let mut model = common::load_tiny();
        peft_rs::peft_model::load_adapter(
            &mut model,
            &fx.join(variant).join("adapter"),
            peft_rs::peft_model::DEFAULT_ADAPTER,
        )
        .unwrap();
        let params = peft_rs::peft_model::trainable_parameters(&model);
        for p in params.values() {
            let _ = p.set_requires_grad(true);
        }
        let groups: BTreeMap<String, (f64, f64)> =
            common::read_json(&fx.join(variant).join("groups.json"));
        assert_eq!(
            params.keys().collect::<Vec<_>>(),
            groups.keys().collect::<Vec<_>>(),
            "{variant}: the trainable tensors"
        );
        let scales = peft_rs::train::optim::loraplus_lr_scales(&params, f("loraplus_lr_ratio"));
        for (k, (lr, wd)) in &groups {
            let ours = f("lr") * scales.get(k).copied().unwrap_or(1.0);
            assert!(
                (ours - lr).abs() <= 1e-15,
                "{variant} {k}: lr {ours} vs PEFT's {lr}"
            );
            assert_eq!(
                *wd,
                f("loraplus_weight_decay"),
                "{variant} {k}: weight decay"
            );
        }
        let mut opt = AdamW::new(
            &params,
            (
                s["betas"][0].as_f64().unwrap(),
                s["betas"][1].as_f64().unwrap(),
            ),
            f("eps"),
            f("loraplus_weight_decay"),
        );
        opt.lr_scale = scales;
        let t = common::tensors(&fx.join(variant).join("steps.safetensors"));
        for step in 0..s["steps"].as_u64().unwrap() {
            for (k, p) in &params {
                p.shallow_clone().zero_grad();
                (p * &t[&format!("grad{step}.{k}")])
                    .sum(Kind::Float)
                    .backward();
            }
            opt.step(&params, f("lr"));
            for (k, p) in &params {
                let want = &t[&format!("after{step}.{k}")];
                let err = (p - want).abs().max().double_value(&[]);
                assert!(
                    err < 1e-6,
                    "{variant} step {step} {k}: max difference {err} from PEFT"
                );
            }
        }
    }
}
