//! Data-parallel training over c10d/Gloo on this machine (127.0.0.1 only):
//! two ranks equal one process with the same global batch, noise differs per
//! rank, a dying rank ends the run, and resume refuses another world size.

mod common;

use std::path::Path;
use std::process::Command;

use common::{losses, max_adapter_diff, max_diff, read_json, series, Cmd};

fn args(data: &Path, out: &Path, extra: &[&str]) -> Cmd {
    let line = "train --device cpu --dtype fp32 --max-seq-len 64 --lora-rank 4 --lr 1e-3 --seed 7 \
                --group-by-length false --dist-timeout 20";
    Cmd::train_tiny(line, data, out).all(extra)
}

fn train(data: &Path, out: &Path, extra: &[&str]) {
    let r = args(data, out, extra).run();
    assert!(
        r.status.success(),
        "train {extra:?} failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

fn eval_losses(out: &Path) -> Vec<f64> {
    series(out, "eval_loss")
}

#[test]
fn two_ranks_equal_one_process_with_the_same_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 22);
    let (one, two, accum) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("accum"),
    );
    // NEFTune on (paper mode): each example's noise follows the example,
    // so the split over processes does not change it.
    let steps = [
        "--max-steps",
        "6",
        "--lora-dropout",
        "0",
        "--neftune-alpha",
        "5",
        "--eval-holdout",
        "5",
    ];
    train(&data, &one, &[&steps[..], &["--batch-size", "4"]].concat());
    train(
        &data,
        &two,
        &[
            &steps[..],
            &["--batch-size", "2", "--nproc", "2", "--save-steps", "3"],
        ]
        .concat(),
    );
    train(
        &data,
        &accum,
        &[&steps[..], &["--batch-size", "2", "--grad-accum", "2"]].concat(),
    );
    let (l1, l2, la) = (losses(&one), losses(&two), losses(&accum));
    assert_eq!(l1.len(), 6);
    let (d_curve, d_accum) = (max_diff(&l1, &l2), max_diff(&l1, &la));
    let (a_two, a_accum) = (max_adapter_diff(&one, &two), max_adapter_diff(&one, &accum));
    eprintln!("2 ranks x 2 vs 1 x 4: curve {d_curve:.2e}, adapter {a_two:.2e}; grad-accum 2 x 2: curve {d_accum:.2e}, adapter {a_accum:.2e}");
    assert!(
        d_curve < 1e-5 && a_two < 1e-5,
        "two ranks differ: {d_curve} {a_two}"
    );
    assert!(
        d_accum < 1e-5 && a_accum < 1e-5,
        "grad-accum differs: {d_accum} {a_accum}"
    );
    // Evaluation is sharded over the ranks and reduced: the same mean.
    let (e1, e2) = (eval_losses(&one), eval_losses(&two));
    assert_eq!(e1.len(), 2, "eval before and after");
    let d_eval = max_diff(&e1, &e2);
    eprintln!("eval loss, 2 ranks vs 1: {d_eval:.2e}");
    assert!(d_eval < 1e-5, "sharded eval differs: {e1:?} {e2:?}");
    let recorded: serde_json::Value = read_json(&two.join("training_args.json"));
    assert_eq!(recorded["world_size"], 2);

    // With dropout on, each rank draws its own masks: the curve moves away
    // from one process's, but not far.
    let (n1, n2) = (tmp.path().join("noisy1"), tmp.path().join("noisy2"));
    let noisy = [
        "--max-steps",
        "6",
        "--lora-dropout",
        "0.1",
        "--neftune-alpha",
        "5",
    ];
    train(&data, &n1, &[&noisy[..], &["--batch-size", "4"]].concat());
    train(
        &data,
        &n2,
        &[&noisy[..], &["--batch-size", "2", "--nproc", "2"]].concat(),
    );
    let d = max_diff(&losses(&n1), &losses(&n2));
    eprintln!("with dropout and NEFTune: curves differ by at most {d:.3e}");
    assert!(d > 1e-6, "rank 1 drew rank 0's dropout masks");
    assert!(d < 0.1 * losses(&n1)[0], "curves far apart: {d}");

    // Resuming with another number of processes is refused by name.
    let r = args(&data, &two, &[])
        .args("--max-steps 8 --lora-dropout 0 --neftune-alpha 5 --eval-holdout 5")
        .args("--batch-size 2 --resume")
        .run();
    common::assert_user_error(&r, &["world_size"]);
}

#[test]
fn a_dying_rank_ends_the_run_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 64);
    let out = tmp.path().join("run");
    let a = args(&data, &out, &[]).args("--max-steps 40 --batch-size 2 --nproc 2 --save-steps 2");
    common::kill_rank_1_then_resume(&a, &out);
}

/// libtorch's CUDA half is loaded at run time, not linked: the binary needs
/// no CUDA library, and without a driver a process maps none (~240 MB less).
/// Where libtorch has CUDA (the cu13 wheel set-up installs, GPU or not),
/// `PEFT_RS_LOAD_CUDA=1` loads it here too: CUDA's kernels are then registered
/// (asked for memory on cuda:0, the runtime answers that the driver is
/// missing, not that CUDA is unknown), and c10d's NCCL backend, a library the
/// binary carries, loads after it with every symbol resolved.
#[test]
fn the_cuda_library_and_nccl_load_at_run_time_where_libtorch_has_cuda() {
    let exe = env!("CARGO_BIN_EXE_peft-rs");
    let readelf = Command::new("readelf").args(["-d", exe]).output().unwrap();
    let needed = String::from_utf8_lossy(&readelf.stdout);
    assert!(needed.contains("libtorch_cpu.so"), "{needed}");
    assert!(
        !needed.contains("cuda") && !needed.contains("nccl"),
        "the binary links a CUDA library: {needed}"
    );
    let plain = Command::new(exe).arg("env").output().unwrap();
    let plain = String::from_utf8_lossy(&plain.stdout);
    if plain.contains("CPU-only build") {
        eprintln!("libtorch without CUDA: nothing to load here");
        return;
    }
    if plain.contains("cuda usable: true") {
        eprintln!("a GPU machine: loaded without being asked");
        assert!(plain.contains("libtorch_cuda: loaded from"), "{plain}");
        return;
    }
    assert!(
        plain.contains("libtorch_cuda: not loaded: no NVIDIA driver"),
        "{plain}"
    );
    let forced = Command::new(exe)
        .arg("env")
        .env("PEFT_RS_LOAD_CUDA", "1")
        .output()
        .unwrap();
    let forced = String::from_utf8_lossy(&forced.stdout);
    assert!(forced.contains("libtorch_cuda: loaded from"), "{forced}");
    assert!(
        forced.contains("NVIDIA driver"),
        "CUDA kernels not registered: {forced}"
    );
    assert!(
        forced.contains("(c10d): gloo, nccl\n"),
        "NCCL did not load: {forced}"
    );
    let bad = Command::new(exe)
        .arg("env")
        .env("PEFT_RS_LOAD_CUDA", "yes")
        .output()
        .unwrap();
    let bad = String::from_utf8_lossy(&bad.stdout);
    assert!(bad.contains("PEFT_RS_LOAD_CUDA=yes: use 1"), "{bad}");
}

/// ZeRO stage 1 (`--shard-optimizer-state`): each of two ranks keeps and
/// updates the AdamW moments of about half the adapter tensors. The run
/// takes the replicated optimizer's steps; its checkpoint holds the same
/// whole state (the moments travel to rank 0); and a sharded run resumes
/// from a replicated run's checkpoint (the moments travel to their owners)
/// and ends where the replicated run ended.
#[test]
fn a_sharded_optimizer_state_takes_the_same_steps_and_checkpoints_it_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 22);
    let steps = "--max-steps 6 --lora-dropout 0 --neftune-alpha 5 --batch-size 2 --nproc 2 \
                 --save-steps 3 --target-modules all-linear";
    let run = |name: &str, extra: &str| {
        let out = tmp.path().join(name);
        let r = args(&data, &out, &[]).args(steps).args(extra).run();
        assert!(r.status.success(), "{name}: {}", common::stderr(&r));
        out
    };
    let replicated = run("replicated", "");
    let sharded = run("sharded", "--shard-optimizer-state");
    let curve = max_diff(&losses(&replicated), &losses(&sharded));
    let adapter = max_adapter_diff(&replicated, &sharded);
    let state = |out: &Path| common::tensors(&out.join("checkpoint-3/optimizer.safetensors"));
    let (a, b) = (state(&replicated), state(&sharded));
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect(),
        "the checkpoints hold other tensors"
    );
    let moments = a
        .iter()
        .map(|(k, t)| common::tensor_diff(t, &b[k]).0)
        .fold(0.0, f64::max);
    let bytes = |out: &Path| {
        let s: serde_json::Value = read_json(&out.join("train_summary.json"));
        s["optimizer_state_bytes"].as_f64().unwrap()
    };
    let held = bytes(&sharded) / bytes(&replicated);
    eprintln!(
        "sharded vs replicated optimizer state: curve {curve:.2e}, adapter {adapter:.2e}, \
         checkpointed moments {moments:.2e}; rank 0 holds {held:.3} of the moments"
    );
    assert!(curve < 1e-6 && adapter < 1e-6, "{curve} {adapter}");
    assert!(moments < 1e-7, "checkpointed moments differ by {moments}");
    assert!(
        (0.4..0.6).contains(&held),
        "rank 0 holds {held} of the moments"
    );

    // The replicated run's folder as it was after step 3.
    let resumed = common::copy_dir(&replicated, &tmp.path().join("resumed"));
    common::copy_dir(
        &replicated.join("checkpoint-3"),
        &resumed.join("checkpoint-3"),
    );
    std::fs::remove_file(resumed.join("adapter_model.safetensors")).unwrap();
    let r = args(&data, &resumed, &[])
        .args(steps)
        .args("--shard-optimizer-state --resume")
        .run();
    assert!(r.status.success(), "resume: {}", common::stderr(&r));
    let d = max_adapter_diff(&replicated, &resumed);
    eprintln!("sharded run resumed from a replicated run's checkpoint: adapter {d:.2e}");
    assert!(d < 1e-6, "resumed adapter differs by {d}");
}
