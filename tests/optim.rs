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

/// Both updates, the fused kernel and ATen operations per tensor, against
/// torch's AdamW with clipping and a schedule.
#[test]
fn adamw_with_clipping_and_a_linear_schedule_matches_torch() {
    adamw_steps(true);
    adamw_steps(false);
}

/// The fused update is torch's fused AdamW (Trainer's default) bit for bit
/// where this build has the kernel, and the per-tensor update is torch's
/// for-loop AdamW; over 30 steps the two round differently, so each is told
/// from the other.
#[test]
fn adamw_updates_are_torchs_fused_and_for_loop_ones() {
    let (_, j) = reference();
    let dir = common::fixture("optim_reference.py", &[], &[]);
    let t = common::tensors(&dir.join("optim_long.safetensors"));
    let s = &j["settings"]["long"];
    let f = |k: &str| s[k].as_f64().unwrap();
    let n = 3;
    let final_diff = (0..n)
        .map(|i| {
            (&t[&format!("long_loop_{i}")] - &t[&format!("long_fused_{i}")])
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max);
    assert!(
        final_diff > 0.0,
        "torch's two AdamWs agree here: the test tells nothing apart"
    );
    // Built wherever the other C++ operations are (libtorch's headers).
    assert_eq!(
        peft_rs::train::optim::FUSED_ADAMW_AVAILABLE,
        peft_rs::fused_norm::AVAILABLE,
        "the fused AdamW kernel is built exactly where the fused norm is"
    );
    for fused in [true, false] {
        let (params, mut opt) = params_and_adamw(&t, "long_p", s, fused);
        for step in 0..s["steps"].as_u64().unwrap() {
            feed_grads(&params, &t, &format!("long_g{step}_"));
            opt.step(&params, f("lr"));
        }
        let exact = fused && peft_rs::train::optim::FUSED_ADAMW_AVAILABLE;
        let key = if exact { "long_fused" } else { "long_loop" };
        for (i, p) in params.values().enumerate() {
            let err = (p - &t[&format!("{key}_{i}")])
                .abs()
                .max()
                .double_value(&[]);
            let tolerance = if exact { 0.0 } else { 1e-6 };
            assert!(
                err <= tolerance,
                "p{i} (fused: {fused}): max difference {err} from torch's {key} (the two differ by {final_diff})"
            );
        }
    }
}

/// The fixture's three parameters `{prefix}{i}` (as `p{i}`), and AdamW
/// with the betas, eps and weight decay of `s`.
fn params_and_adamw(
    t: &HashMap<String, Tensor>,
    prefix: &str,
    s: &Value,
    fused: bool,
) -> (BTreeMap<String, Tensor>, AdamW) {
    let params: BTreeMap<String, Tensor> = (0..3)
        .map(|i| {
            let p = t[&format!("{prefix}{i}")].copy().set_requires_grad(true);
            (format!("p{i}"), p)
        })
        .collect();
    let beta = |i: usize| s["betas"][i].as_f64().unwrap();
    let f = |k: &str| s[k].as_f64().unwrap();
    let mut opt = AdamW::new(&params, (beta(0), beta(1)), f("eps"), f("weight_decay"));
    opt.fused = fused;
    (params, opt)
}

/// Gives parameter `p{i}` the fixture's gradient `{prefix}{i}`.
fn feed_grads(params: &BTreeMap<String, Tensor>, t: &HashMap<String, Tensor>, prefix: &str) {
    for (i, p) in params.values().enumerate() {
        p.shallow_clone().zero_grad();
        // d/dp sum(p * g) = g
        (p * &t[&format!("{prefix}{i}")])
            .sum(Kind::Float)
            .backward();
    }
}

fn adamw_steps(fused: bool) {
    let (t, j) = reference();
    let s = &j["settings"];
    let f = |k: &str| s[k].as_f64().unwrap();
    let (params, mut opt) = params_and_adamw(&t, "p", s, fused);
    let total = s["total"].as_u64().unwrap();
    let warmup = s["warmup"].as_u64().unwrap();
    for step in 0..total {
        feed_grads(&params, &t, &format!("g{step}_"));
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
                "step {step}, p{i} (fused: {fused}): max difference {err} from torch"
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
