//! Logits and greedy generation on a CUDA device against transformers' fp32
//! CPU logits (the `logits.safetensors` the parity tests' fixture script
//! writes) and against our own CPU path, for the GPU check script.
//!
//! device_parity MODEL_DIR REFERENCE_DIR [--device cuda:0]
//!
//! REFERENCE_DIR holds `logits.safetensors` (input_ids, attention_mask,
//! logits) and `prompts.jsonl`. Prints one JSON line per dtype. Without a GPU
//! (or with --device cpu) it checks the CPU path, so the script can be tried
//! anywhere.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use peft_rs::generate::{generate_batch, GenerationConfig};
use peft_rs::models::{self, Pretrained};
use tch::{Device, Kind, Tensor};

#[global_allocator]
static GLOBAL: peft_rs::Jemalloc = peft_rs::Jemalloc;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model_dir, reference) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let device = match args.iter().position(|a| a == "--device") {
        Some(i) => peft_rs::device::parse_device(&args[i + 1])?,
        None => {
            // libtorch's CUDA library is loaded at run time (peft_rs::cuda_library).
            peft_rs::cuda_library::ensure_loaded();
            Device::cuda_if_available()
        }
    };
    let r: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(reference.join("logits.safetensors"))
            .context("reading the reference logits")?
            .into_iter()
            .collect();
    let (ids, mask) = (&r["input_ids"], &r["attention_mask"]);
    let valid = mask.to_kind(Kind::Bool).unsqueeze(-1);
    let expected = &r["logits"];
    let scale = expected.abs().max().double_value(&[]);

    // Greedy answers on our CPU fp32 path, which the parity tests hold equal
    // to transformers', as the reference for the device's answers.
    let cpu = Pretrained::load(&model_dir, Kind::Float, Device::Cpu)?;
    let prompts: Vec<Vec<u32>> = std::fs::read_to_string(reference.join("prompts.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["prompt"].as_str().map(str::to_owned))
        .map(|p| cpu.tokenizer.encode(&p, true))
        .collect::<Result<_>>()?;
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        eos_token_ids: cpu.eos_token_ids.clone(),
        ..GenerationConfig::default()
    };
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let limits = vec![cfg.max_new_tokens; refs.len()];
    let cpu_answers = generate_batch(&cpu.model, &refs, &limits, &cfg)?;
    drop(cpu);

    for kind in [Kind::Float, Kind::BFloat16] {
        let t = Instant::now();
        let model = models::load(&model_dir, kind, device)?;
        sync(device);
        let load_s = t.elapsed().as_secs_f64();
        let ours = tch::no_grad(|| model.forward(&ids.to_device(device)))
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        let max = (&ours - expected)
            .abs()
            .masked_fill(&valid.logical_not(), 0.0)
            .max()
            .double_value(&[]);
        let answers = generate_batch(&model, &refs, &limits, &cfg)?;
        let same = answers
            .iter()
            .zip(&cpu_answers)
            .filter(|(a, b)| a == b)
            .count();
        println!(
            "{}",
            serde_json::json!({
                "model": model_dir.file_name().map(|n| n.to_string_lossy().into_owned()),
                "device": format!("{device:?}"), "dtype": peft_rs::device::dtype_name(kind),
                "max_abs_logit_diff_vs_transformers_cpu_fp32": max,
                "relative_to_max_logit": max / scale,
                "greedy_answers_equal_to_cpu_fp32": format!("{same}/{}", answers.len()),
                "load_seconds": load_s,
            })
        );
    }
    Ok(())
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}
