//! The frozen base sharded over two ranks (`--fsdp`, c10d/Gloo on
//! 127.0.0.1): the same loss curve, evaluation and adapter as one process,
//! dense and 4-bit, with and without gradient checkpointing; each rank holds
//! half the sharded bytes; the adapter loads in PEFT; a killed rank ends the
//! run and the run resumes.

mod common;

use std::path::Path;

use common::{losses, max_adapter_diff, max_diff, read_json, series, Cmd};
use peft_rs::models::LlamaForCausalLM;
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use tch::{Device, Kind, Tensor};

const LINE: &str = "train --device cpu --dtype fp32 --max-seq-len 64 --lora-rank 4 --lr 1e-3 \
    --seed 7 --group-by-length false --dist-timeout 20 --lora-dropout 0 --neftune-alpha 5";

fn args(data: &Path, out: &Path, extra: &[&str]) -> Cmd {
    Cmd::train_tiny(LINE, data, out).all(extra)
}

fn train(data: &Path, out: &Path, extra: &[&str]) {
    let r = args(data, out, extra).run();
    assert!(
        r.status.success(),
        "train {extra:?} failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// Runs one process with `--batch-size 4` and two sharded ranks with 2
/// each for every variant of `extra`, and checks that each matches.
fn sharded_equals_one_process(tag: &str, common_args: &[&str], variants: &[&[&str]]) {
    sharded_equals_one_process_of(&common::tiny(), tag, common_args, variants)
}

fn sharded_equals_one_process_of(
    model: &Path,
    tag: &str,
    common_args: &[&str],
    variants: &[&[&str]],
) {
    let train = |data: &Path, out: &Path, extra: &[&str]| {
        let r = Cmd::new(LINE)
            .path("--model", model)
            .path("--data", data)
            .path("--output", out)
            .all(extra)
            .run();
        assert!(
            r.status.success(),
            "{tag}: train {extra:?} failed: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    };
    let tmp = tempfile::tempdir().unwrap();
    // 17 training records: the last global batch of 4 has one row, so
    // rank 1 has none and must still join rank 0's gathers.
    let data = common::alpaca(tmp.path(), 22);
    let one = tmp.path().join("one");
    train(&data, &one, &[common_args, &["--batch-size", "4"]].concat());
    let (l1, e1) = (losses(&one), series(&one, "eval_loss"));
    assert_eq!(l1.len(), 6);
    assert_eq!(e1.len(), 2, "eval before and after");
    for (i, extra) in variants.iter().enumerate() {
        let two = tmp.path().join(format!("two{i}"));
        // Two rows per rank, in one micro-batch unless the variant says otherwise.
        let batch: &[&str] = match extra.contains(&"--batch-size") {
            true => &[],
            false => &["--batch-size", "2"],
        };
        let flags = ["--nproc", "2", "--fsdp"];
        train(&data, &two, &[common_args, batch, &flags, extra].concat());
        let curve = max_diff(&l1, &losses(&two));
        let eval = max_diff(&e1, &series(&two, "eval_loss"));
        let adapter = max_adapter_diff(&one, &two);
        let summary: serde_json::Value = read_json(&two.join("train_summary.json"));
        let f = &summary["fsdp"];
        let held = f["held_fraction"]
            .as_f64()
            .expect("train_summary.json fsdp");
        eprintln!(
            "{tag} {extra:?}: 2 sharded ranks vs 1 process: curve {curve:.2e}, eval {eval:.2e}, \
             adapter {adapter:.2e}; rank 0 holds {:.4} of the sharded bytes ({} of {}), \
             {} gathers, {:.3} s waited",
            held,
            f["sharded_bytes_held"],
            f["sharded_bytes_whole"],
            f["gathers"],
            f["gather_wait_seconds"]
        );
        assert!(curve < 1e-5, "{tag} {extra:?}: curves differ by {curve}");
        assert!(eval < 1e-5, "{tag} {extra:?}: eval differs by {eval}");
        assert!(
            adapter < 1e-5,
            "{tag} {extra:?}: adapters differ by {adapter}"
        );
        // Half, up to each tensor's padding to whole 8-element runs.
        assert!((0.5..0.502).contains(&held), "{tag}: rank 0 holds {held}");
        assert!(f["gathers"].as_u64().unwrap() > 0);
        let sharded_state = !extra.contains(&"--shard-optimizer-state");
        assert_eq!(
            summary["optimizer_state_sharded"], sharded_state,
            "{tag} {extra:?}"
        );
        // ZeRO-2: the gradients are summed layer by layer during the
        // checkpointed backward pass, and sharded with the state.
        let checkpointing = !extra.contains(&"--gradient-checkpointing");
        assert_eq!(
            summary["gradients_sharded"],
            sharded_state && checkpointing,
            "{tag} {extra:?}"
        );
    }
}

#[test]
fn two_sharded_ranks_equal_one_process() {
    let steps = ["--max-steps", "6", "--eval-holdout", "5"];
    sharded_equals_one_process(
        "fp32",
        &steps,
        &[
            // Checkpointing is on by default with --fsdp: the backward
            // pass gathers each layer again.
            &[],
            &["--gradient-checkpointing", "false"],
            &["--fsdp-prefetch", "false"],
            // The AdamW moments are sharded by default with --fsdp, and
            // with checkpointing the gradients too.
            &["--shard-optimizer-state", "false"],
            // Sharded gradients summed over two micro-batches per step.
            &["--batch-size", "1", "--gradient-accumulation-steps", "2"],
        ],
    );
}

/// The embeddings and head are used sharded by vocabulary, untied (the
/// tiny Llama) and tied (the tiny Mistral); a head with an adapter is
/// gathered whole for the loss instead.
#[test]
fn sharded_heads_tied_untied_and_adapted_equal_one_process() {
    let steps = ["--max-steps", "6", "--eval-holdout", "5"];
    sharded_equals_one_process_of(&common::model_dir("mistral"), "tied head", &steps, &[&[]]);
    let with_head = [&steps[..], &["--target-modules", "q_proj,v_proj,lm_head"]].concat();
    sharded_equals_one_process("adapter on lm_head", &with_head, &[&[]]);
}

#[test]
fn two_sharded_ranks_equal_one_process_on_a_4bit_base() {
    let q = [
        "--max-steps",
        "6",
        "--eval-holdout",
        "5",
        "--quantize",
        "nf4",
        "--bnb-4bit-use-double-quant",
    ];
    sharded_equals_one_process("nf4", &q, &[&[], &["--gradient-checkpointing", "false"]]);
}

/// What the sharded run wrote is an ordinary PEFT adapter: Python PEFT
/// loads it (every key and value, checked by the script) and computes what
/// peft-rs computes with it.
#[test]
fn a_sharded_run_writes_an_adapter_peft_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 12);
    let out = tmp.path().join("run");
    train(
        &data,
        &out,
        &[
            "--max-steps",
            "3",
            "--lr",
            "1e-2",
            "--batch-size",
            "2",
            "--nproc",
            "2",
            "--fsdp",
        ],
    );
    tch::manual_seed(3);
    let ids = Tensor::randint_low(3, 200, [3, 12], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([3, 12], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 9, 3).narrow(0, 1, 1).fill_(0);
    let inputs = tmp.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids), ("attention_mask", &mask)], &inputs).unwrap();
    let keep = mask.eq(0).unsqueeze(-1);
    let masked = |t: &Tensor| t.masked_fill(&keep, 0.0);
    let logits = |adapter: bool| {
        let mut m: LlamaForCausalLM = common::load_tiny();
        if adapter {
            peft_model::load_adapter(&mut m, &out, DEFAULT_ADAPTER).unwrap();
        }
        masked(&tch::no_grad(|| m.forward(&ids)))
    };
    let (ours, plain) = (logits(true), logits(false));
    let theirs = masked(&common::peft_logits(
        &common::tiny(),
        &inputs,
        Some(&out),
        None,
    ));
    let d = (&ours - &theirs).abs().max().double_value(&[]);
    let effect = (&ours - &plain).abs().max().double_value(&[]);
    eprintln!(
        "sharded run's adapter in PEFT: max |logit diff| {d:.2e} (adapter effect {effect:.2e})"
    );
    assert!(effect > 1e-3, "the adapter changes nothing: {effect}");
    assert!(d < 1e-4, "PEFT computes otherwise with it: {d}");
}

#[test]
fn a_killed_sharded_rank_ends_the_run_and_it_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 64);
    let out = tmp.path().join("run");
    let a = args(&data, &out, &[])
        .args("--max-steps 40 --batch-size 2 --nproc 2 --fsdp --save-steps 2");
    common::kill_rank_1_then_resume(&a, &out);
    // Another world size is refused by name, sharded or not.
    let r = args(&data, &out, &[])
        .args("--max-steps 44 --batch-size 4 --fsdp --resume")
        .run();
    common::assert_user_error(&r, &["world_size"]);
}

/// What `--fsdp` cannot do yet is refused by name before anything loads.
#[test]
fn settings_fsdp_cannot_serve_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 8);
    for (extra, expect) in [
        ("--use-dora", "use_dora"),
        ("--init-lora-weights pissa", "init_lora_weights"),
    ] {
        let r = args(&data, &tmp.path().join("x"), &[])
            .args("--max-steps 1 --batch-size 1 --nproc 2 --fsdp")
            .args(extra)
            .run();
        let e = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{extra} with --fsdp ran");
        assert!(e.contains(expect) && e.contains("--fsdp"), "{extra}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    }
}
