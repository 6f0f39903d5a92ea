//! Regularizers chosen by name: a run configured only by a settings file
//! with two built-in regularizers (NEFTune and Gaussian noise on a decoder
//! layer's output) trains, records both in `training_args.json`, stops on a
//! signal and resumes to the curve of an uninterrupted run; the flag form
//! names them too, and unknown names, keys and changes are refused by name.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    assert_user_error, losses, max_adapter_diff, s, scratch, steps_logged, tiny, wait_for, Cmd,
};

const STEPS: u64 = 60;

/// A settings file naming everything of a run in `out`, with `noise_std`
/// the hidden-state noise's standard deviation.
fn settings(name: &str, out: &Path, noise_std: f64) -> PathBuf {
    let data = common::alpaca(scratch(), 48);
    let path = scratch().join(name);
    let text = format!(
        r#"model = "{}"
data = "{}"
output = "{}"
device = "cpu"
max_steps = {STEPS}
lora_rank = 2
max_seq_length = 64
per_device_train_batch_size = 2
lora_dropout = 0.0
seed = 11

[[regularizers]]
kind = "neftune"
alpha = 5
mode = "paper"

[[regularizers]]
kind = "hidden_noise"
layer = 1
std = {noise_std}
"#,
        s(&tiny()),
        s(&data),
        s(out)
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn train(config: &Path, extra: &[&str]) -> std::process::Output {
    Cmd::new("train")
        .path("--config", config)
        .all(extra)
        .run_within(Duration::from_secs(600))
}

#[test]
fn a_settings_file_with_two_regularizers_trains_records_both_and_resumes() {
    let whole = scratch().join("whole");
    let r = train(&settings("whole.toml", &whole, 0.01), &[]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("regularizers: neftune(alpha=5, mode=paper, noise=uniform), hidden_noise(layers=1, std=0.01)"),
        "{err}"
    );
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("training_args.json")).unwrap())
            .unwrap();
    assert_eq!(
        args["regularizers"],
        serde_json::json!([
            {"kind": "neftune", "alpha": 5, "mode": "paper"},
            {"kind": "hidden_noise", "layer": 1, "std": 0.01}
        ])
    );

    // The same run, stopped by SIGINT after its third step and resumed.
    let cut = scratch().join("cut");
    let config = settings("cut.toml", &cut, 0.01);
    let child = Cmd::new("train").path("--config", &config).spawn(&[]);
    wait_for("three steps", Duration::from_secs(300), || {
        steps_logged(&cut) >= 3
    });
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = train(&config, &["--resume"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        losses(&cut),
        losses(&whole),
        "the resumed curve continues the run"
    );
    assert_eq!(max_adapter_diff(&cut, &whole), 0.0);

    // Another noise is another run: --resume names the setting.
    let changed = settings("changed.toml", &cut, 0.02);
    assert_user_error(&train(&changed, &["--resume"]), &["regularizers", "0.02"]);
}

#[test]
fn regularizers_by_flag_and_unknown_names_and_keys() {
    let data = common::alpaca(scratch(), 24);
    let run = |out: &str, extra: &[&str]| {
        Cmd::new("train --device cpu --max-steps 2 --lora-rank 2 --max-seq-len 48 --seed 3")
            .path("--model", &tiny())
            .path("--data", &data)
            .path("--output", &scratch().join(out))
            .all(extra)
            .run_within(Duration::from_secs(300))
    };
    // The short form and the named form are one regularizer.
    let short = run("short", &["--neftune-alpha", "5"]);
    assert!(
        short.status.success(),
        "{}",
        String::from_utf8_lossy(&short.stderr)
    );
    let named = run("named", &["--regularizer", "neftune:alpha=5"]);
    assert!(
        named.status.success(),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
    assert_eq!(
        losses(&scratch().join("short")),
        losses(&scratch().join("named"))
    );
    assert_user_error(
        &run(
            "twice",
            &["--neftune-alpha", "5", "--regularizer", "neftune:alpha=5"],
        ),
        &["NEFTune is asked for twice"],
    );
    assert_user_error(
        &run("unknown", &["--regularizer", "dropout:p=0.1"]),
        &[
            "unknown regularizer `dropout`",
            "neftune (alpha, mode, noise)",
            "hidden_noise (layer, std)",
        ],
    );
    assert_user_error(
        &run("key", &["--regularizer", "hidden_noise:layer=1,sigma=0.1"]),
        &["unknown key `sigma`", "std ("],
    );
    assert_user_error(
        &run("form", &["--regularizer", "hidden_noise:layer"]),
        &["--regularizer", "KEY=VALUE"],
    );
}
