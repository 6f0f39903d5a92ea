//! `peft-rs train` end to end on the tiny model: reproducibility, NEFTune on
//! and off, kill-and-resume, config files, and errors; and a short run on the
//! default model that lowers the held-out loss.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_user_error, losses, metrics, read_json, s, tiny, train_tiny_small, Cmd};
use tch::Tensor;

fn run_train(data: &Path, out: &Path, extra: &[&str]) {
    let r = train_tiny_small(data, out).all(extra).run();
    assert!(
        r.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

fn adapter(out: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(out.join("adapter_model.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn same_seed_same_curve_and_neftune_alpha_zero_is_off() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 40);
    let steps = ["--max-steps", "5", "--eval-holdout", "8"];
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let zero = tmp.path().join("zero");
    let noisy = tmp.path().join("noisy");
    run_train(&data, &a, &steps);
    run_train(&data, &b, &steps);
    run_train(
        &data,
        &zero,
        &[&steps[..], &["--neftune-alpha", "0"]].concat(),
    );
    run_train(
        &data,
        &noisy,
        &[&steps[..], &["--neftune-alpha", "5"]].concat(),
    );
    let la = losses(&a);
    assert_eq!(la.len(), 5);
    assert_eq!(
        la,
        losses(&b),
        "same seed, same data: the loss curve must repeat bit for bit"
    );
    assert_eq!(
        la,
        losses(&zero),
        "--neftune-alpha 0 must equal no regularizer"
    );
    let ln = losses(&noisy);
    assert_ne!(la, ln, "alpha 5 must change the training loss");
    // The first step's loss is measured with noise on; the evaluation before it has noise off.
    let eval0 = |o: &Path| metrics(o)[0]["eval_loss"].as_f64().unwrap();
    assert_eq!(eval0(&a), eval0(&noisy), "evaluation must not be noised");
    let args: serde_json::Value = read_json(&noisy.join("training_args.json"));
    assert_eq!(args["neftune_noise_alpha"], 5.0);
    assert_eq!(args["neftune_mode"], "paper");
    // What was used, not "auto" (this machine has no GPU).
    assert_eq!(args["device"], "cpu");
    assert_eq!(args["dtype"], "fp32");
}

#[test]
fn kill_and_resume_gives_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 64);
    let extra = [
        "--max-steps",
        "12",
        "--save-steps",
        "2",
        "--grad-accum",
        "2",
        "--lora-dropout",
        "0.1",
        "--neftune-alpha",
        "5",
        "--report-to",
        "tensorboard",
    ];
    let full = tmp.path().join("full");
    run_train(&data, &full, &extra);

    let cut = tmp.path().join("cut");
    let cmd = train_tiny_small(&data, &cut).all(&extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_peft-rs"))
        .args(&cmd.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // SIGKILL once a mid-run checkpoint exists.
    let t0 = Instant::now();
    while !cut.join("checkpoint-6").join("COMPLETE").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !cut.join("adapter_model.safetensors").exists(),
        "killed before the end"
    );

    cmd.arg("--resume").run_ok();
    let (x, y) = (adapter(&full), adapter(&cut));
    assert_eq!(x.len(), y.len());
    for ((k1, t1), (k2, t2)) in x.iter().zip(&y) {
        assert_eq!(k1, k2);
        assert!(t1.equal(t2), "{k1} differs after kill and resume");
    }
    assert_eq!(
        losses(&full),
        losses(&cut),
        "the resumed loss curve must continue the original"
    );
    // TensorBoard drops what the killed run logged after its checkpoint.
    common::assert_tensorboard_matches_metrics(&cut);
}

/// `train --config FILE` and the words of `line`, in a new temporary folder
/// `dir`. FILE, `name` in `dir` (TOML or YAML by its extension), sets
/// `model`, `data` (the first `records` Alpaca records) and `output`
/// (`dir/out`), then holds `rest`. The folder, the settings the run recorded,
/// and its output folder.
fn train_with_config(
    records: usize,
    name: &str,
    rest: &str,
    line: &str,
) -> (tempfile::TempDir, serde_json::Value, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = common::alpaca(dir, records);
    let out = dir.join("out");
    let cfg = dir.join(name);
    let sep = if name.ends_with(".toml") { " =" } else { ":" };
    std::fs::write(
        &cfg,
        format!(
            "model{sep} {:?}\ndata{sep} {:?}\noutput{sep} {:?}\n{rest}",
            s(&tiny()),
            s(&data),
            s(&out)
        ),
    )
    .unwrap();
    Cmd::new("train").path("--config", &cfg).args(line).run_ok();
    (tmp, read_json(&out.join("training_args.json")), out)
}

#[test]
fn config_file_with_flag_overrides() {
    let settings = "lora_rank = 2\nmax_steps = 2\nlearning_rate = 5e-4\ndevice = \"cpu\"\nmax_seq_length = 64\n";
    let (tmp, args, out) = train_with_config(24, "run.toml", settings, "--lora-rank 3");
    assert_eq!(args["lora_rank"], 3, "the flag overrides the file");
    assert_eq!(
        args["learning_rate"], 5e-4,
        "the file overrides the default"
    );
    let cfg_json: serde_json::Value = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg_json["r"], 3);

    let with_config =
        |file: &Path, line: &str| Cmd::new("train").path("--config", file).args(line).run();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "lora_rnak: 4\n").unwrap();
    assert_user_error(&with_config(&bad, ""), &["bad.yaml", "lora_rnak"]);
    // A bad value names the field and the file when it comes from the file,
    // and the flag when it comes from the command line.
    let zero = tmp.path().join("zero.toml");
    std::fs::write(&zero, "lora_rank = 0\nlearning_rate = 1e-3\n").unwrap();
    assert_user_error(
        &with_config(&zero, ""),
        &["zero.toml", "field `lora_rank` = 0", "at least 1"],
    );
    assert_user_error(
        &with_config(&zero, "--lora-rank 2 --lr -1"),
        &["--lr -1", "> 0"],
    );
    // LoRA+'s groups carry their own weight decay, as in PEFT: an
    // optimizer-wide one would be dropped, so it is refused by name.
    std::fs::write(&zero, "loraplus_lr_ratio = 16.0\nweight_decay = 0.01\n").unwrap();
    assert_user_error(
        &with_config(&zero, ""),
        &["zero.toml", "weight_decay", "--loraplus-weight-decay"],
    );
    assert_user_error(
        &with_config(&zero, "--weight-decay 0 --loraplus-lr-ratio -2"),
        &["--loraplus-lr-ratio -2", "> 0"],
    );
    std::fs::write(&zero, "scheduler = \"constant\"\n").unwrap();
    assert_user_error(&with_config(&zero, ""), &["zero.toml", "scheduler"]);
    std::fs::write(&zero, "lr_scheduler_type = \"step\"\n").unwrap();
    assert_user_error(
        &with_config(&zero, ""),
        &["zero.toml", "step", "constant_with_warmup"],
    );
}

#[test]
fn a_flag_turns_off_a_boolean_from_the_config_file() {
    let settings = "use_dora: true\ngroup_by_length: true\nmax_steps: 1\ndevice: cpu\nmax_seq_length: 48\nlora_rank: 2\nlr_scheduler_type: constant_with_warmup\n";
    let (_tmp, args, _) = train_with_config(
        12,
        "run.yaml",
        settings,
        "--use-dora false --no-group-by-length",
    );
    assert_eq!(
        args["use_dora"], false,
        "the flag turns the file's true off"
    );
    assert_eq!(args["group_by_length"], false);
    assert_eq!(args["lr_scheduler_type"], "constant_with_warmup");
    assert_eq!(
        args["lora_rank"], 2,
        "the file's value stays where no flag is given"
    );
}

#[test]
fn bad_data_and_flags_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let train = |data: &Path, line: &str| train_tiny_small(data, &out).args(line).run();
    // Writes `text` to `file` and trains on it.
    let train_on = |file: &Path, text: &str| {
        std::fs::write(file, text).unwrap();
        train(file, "")
    };
    let jsonl = tmp.path().join("d.jsonl");
    assert_user_error(
        &train_on(&jsonl, "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\", \"outptu\": \"d\"}\n"),
        &["d.jsonl:2", "`output`"],
    );
    assert_user_error(
        &train_on(&jsonl, "{\"instruction\": \"a\", \"output\": 3}\n"),
        &["d.jsonl:1", "`output`", "string"],
    );
    assert_user_error(
        &train_on(
            &jsonl,
            "{\"instruction\": \"a\", \"output\": \"b\"}\nnot json\n",
        ),
        &["d.jsonl:2", "JSON"],
    );
    assert_user_error(&train_on(&jsonl, ""), &["d.jsonl", "empty"]);
    let arr = tmp.path().join("a.json");
    assert_user_error(
        &train_on(
            &arr,
            "[\n {\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": \"a\"}\n]",
        ),
        &["a.json:3", "`output`"],
    );
    std::fs::write(&arr, "[{\"instruction\": \"a\", \"output\": \"b\"}]").unwrap();
    assert_user_error(&train(&arr, "--lora-alpha 0"), &["--lora-alpha"]);
    assert_user_error(
        &train(&arr, "--neftune-mode trl"),
        &["--neftune-mode", "trl"],
    );
    assert_user_error(
        &train(&arr, "--target-modules q_proj,qkv"),
        &["qkv", "matches no linear layer"],
    );
    // Keeping frozen products is part of checkpointing a dense base.
    for keep in [
        "--gradient-checkpointing-keep-mlp",
        "--gradient-checkpointing-keep-attention",
    ] {
        assert_user_error(&train(&arr, keep), &[keep, "--gradient-checkpointing"]);
        assert_user_error(
            &train(
                &arr,
                &format!("{keep} --quantize nf4 --gradient-checkpointing"),
            ),
            &[keep, "--quantize"],
        );
    }
}

#[test]
fn a_diverging_run_stops_with_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 16);
    let out = tmp.path().join("out");
    let mut cmd =
        train_tiny_small(&data, &out).args("--max-steps 6 --max-grad-norm 0 --warmup-steps 0");
    let lr_pos = cmd.0.iter().position(|a| *a == "--lr").unwrap();
    cmd.0[lr_pos + 1] = "1e30".into();
    assert_user_error(&cmd.run(), &["loss became", "at step"]);
}

#[test]
fn training_the_default_model_lowers_held_out_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 160);
    let out = tmp.path().join("out");
    Cmd::new("train")
        .path("--data", &data)
        .path("--output", &out)
        .args("--device cpu --batch-size 4 --max-seq-len 128 --max-steps 12 --lr 1e-3")
        .args("--eval-holdout 16 --neftune-alpha 5")
        .run_ok();
    let m = metrics(&out);
    let before = m.first().unwrap()["eval_loss"].as_f64().unwrap();
    let after = m.last().unwrap()["eval_loss"].as_f64().unwrap();
    eprintln!("held-out loss {before:.4} -> {after:.4}");
    assert!(after < before, "held-out loss {before} -> {after}");
}

#[test]
fn progress_is_printed_as_plain_lines_without_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 24);
    let out = tmp.path().join("out");
    let r = train_tiny_small(&data, &out).args("--max-steps 4").run_ok();
    let stderr = String::from_utf8_lossy(&r.stderr);
    for step in 1..=4 {
        assert!(
            stderr.contains(&format!("step {step}/4  loss ")),
            "no plain progress line for step {step}: {stderr}"
        );
    }
    assert!(stderr.contains("tok/s  eta "));
}
