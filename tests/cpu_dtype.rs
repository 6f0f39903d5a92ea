//! `--dtype auto` on the CPU: `peft-rs env` reports both measured matmul
//! rates and the choice, the choice follows the CPU's bf16 flags (never
//! bf16 without one) and is the same when asked again, and a run with the default dtype records and prints
//! what the probe chose. (Both outcomes of the decision itself are forced
//! in `src/cpu.rs`'s unit tests, for CPUs of every kind.)

mod common;

use common::{read_json, Cmd};

/// What `peft-rs env` says `--dtype auto` picks on this CPU: "bf16" or "fp32".
fn env_choice() -> (String, String) {
    let out = Cmd::new("env").run_ok();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu matmul"))
        .unwrap_or_else(|| panic!("no cpu matmul line in {text}"))
        .to_owned();
    let choice = line
        .split("--dtype auto on the cpu: ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no choice in {line}"))
        .to_owned();
    (choice, text)
}

#[test]
fn env_reports_both_rates_and_a_choice_that_follows_the_flags() {
    let (choice, text) = env_choice();
    assert!(choice == "bf16" || choice == "fp32", "{text}");
    let line = text.lines().find(|l| l.starts_with("cpu matmul")).unwrap();
    let rate = |kind: &str| -> f64 {
        line.split(&format!("{kind} "))
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {kind} rate in {line}"))
    };
    assert!(rate("fp32") > 0.0 && rate("bf16") > 0.0, "{line}");
    let flags = peft_rs::cpu::flags();
    let native = peft_rs::cpu::bf16_flags(&flags);
    if native.is_empty() {
        assert_eq!(choice, "fp32", "no bf16 flag, yet: {text}");
    }
    if choice == "bf16" {
        assert!(!native.is_empty(), "bf16 without a bf16 flag: {text}");
        assert!(
            rate("bf16") >= peft_rs::cpu::EMULATED_BELOW * rate("fp32"),
            "bf16 chosen although emulated: {line}"
        );
    }
    // The choice follows the CPU, not its load: asked again, the same.
    assert_eq!(
        env_choice().0,
        choice,
        "the choice changed between two runs"
    );
    assert!(
        text.contains(&format!("--device auto picks: device cpu, dtype {choice}"))
            || peft_rs::device::cuda_is_available(),
        "{text}"
    );
}

#[test]
fn a_run_with_the_default_dtype_records_and_prints_the_cpus_choice() {
    let (choice, _) = env_choice();
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 8);
    let out = tmp.path().join("run");
    let r = Cmd::train_tiny(
        "train --device cpu --max-steps 1 --lora-rank 2 --max-seq-len 96",
        &data,
        &out,
    )
    .run_ok();
    let err = common::stderr(&r);
    assert!(
        err.contains(&format!(
            "training on device cpu, dtype {choice} (auto: {choice}: "
        )),
        "{err}"
    );
    let args: serde_json::Value = read_json(&out.join("training_args.json"));
    assert_eq!(args["dtype"], choice.as_str());
    let summary: serde_json::Value = read_json(&out.join("train_summary.json"));
    let peak = summary["peak_rss_bytes"].as_u64().unwrap();
    let anon = summary["max_rss_anon_bytes"].as_u64().unwrap();
    assert!(peak >= anon && anon > 0, "{summary}");
}
