//! Choosing the device and the dtype of the frozen weights.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::{Cuda, Device, Kind};

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`; `auto` picks CUDA when usable.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => cuda(0)?,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n)?,
            _ => bail!("--device `{other}`: expected auto, cpu, cuda or cuda:N"),
        },
    })
}

fn cuda(n: usize) -> Result<Device> {
    let count = if Cuda::is_available() {
        Cuda::device_count() as usize
    } else {
        0
    };
    if n >= count {
        bail!(
            "--device cuda:{n}: {} (run `peft-rs env` to see what libtorch finds)",
            if count == 0 {
                "CUDA is not usable here".to_owned()
            } else {
                format!("only {count} CUDA device(s)")
            }
        );
    }
    Ok(Device::Cuda(n))
}

/// Parses `auto`, `fp32`, `bf16` or `fp16` (and their torch spellings).
///
/// `auto` is fp32 on CPU (bf16 matmul there is two orders of magnitude
/// slower) and bf16 on CUDA.
pub fn parse_dtype(s: &str, device: Device) -> Result<Kind> {
    Ok(match s {
        "auto" if device == Device::Cpu => Kind::Float,
        "auto" => Kind::BFloat16,
        "fp32" | "float32" | "f32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "fp16" | "float16" | "f16" | "half" => Kind::Half,
        other => bail!("--dtype `{other}`: expected auto, fp32, bf16 or fp16"),
    })
}

/// A short name for a kind, as used on the command line.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "fp32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "fp16",
        _ => "other",
    }
}

/// The model directory used when `--model` is omitted: `$PEFT_RS_DEFAULT_MODEL`,
/// or SmolLM2-135M-Instruct as `scripts/setup.sh` converts it into `models/`.
pub fn default_model_dir() -> PathBuf {
    match std::env::var_os("PEFT_RS_DEFAULT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/SmolLM2-135M-Instruct"
        )),
    }
}

/// `--model` or, when absent, the default model, with a hint when it is missing.
pub fn resolve_model_dir(model: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m);
    }
    let d = default_model_dir();
    if !d.join("config.json").exists() {
        bail!(
            "no --model given and the default model is not at {} (run ./scripts/setup.sh, or set PEFT_RS_DEFAULT_MODEL)",
            d.display()
        );
    }
    Ok(d)
}
