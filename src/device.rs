//! Choosing the device and the dtype of the frozen weights.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::{Cuda, Device, Kind};

/// `--device`: where the model runs, as the user asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// CUDA when libtorch can use it, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Self::Cuda(n),
                _ => bail!("`{other}`: expected auto, cpu, cuda or cuda:N"),
            },
        })
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// The device this resolves to on this machine.
    pub fn resolve(self) -> Result<Device> {
        parse_device(&self.to_string())
    }
}

/// `--dtype`: the dtype of the frozen weights, as the user asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DtypeArg {
    /// fp32 on the CPU (where bf16 matmul is two orders of magnitude
    /// slower), bf16 on CUDA.
    #[default]
    Auto,
    /// 32-bit float.
    #[value(alias = "float32", alias = "f32")]
    Fp32,
    /// bfloat16.
    #[value(alias = "bfloat16")]
    Bf16,
    /// IEEE half precision (training uses dynamic loss scaling).
    #[value(alias = "float16", alias = "f16", alias = "half")]
    Fp16,
}

impl FromStr for DtypeArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| anyhow::anyhow!("`{s}`: expected auto, fp32, bf16 or fp16"))
    }
}

impl fmt::Display for DtypeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
            Self::Fp16 => "fp16",
        })
    }
}

impl DtypeArg {
    /// The libtorch kind on `device`.
    pub fn resolve(self, device: Device) -> Kind {
        match self {
            Self::Auto if device == Device::Cpu => Kind::Float,
            Self::Auto | Self::Bf16 => Kind::BFloat16,
            Self::Fp32 => Kind::Float,
            Self::Fp16 => Kind::Half,
        }
    }
}

/// Serialises through `Display`/`FromStr`, so files hold the command-line spelling.
macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(DeviceArg);
serde_as_string!(DtypeArg);

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
    let arg: DtypeArg = s.parse().map_err(|e| anyhow::anyhow!("--dtype {e}"))?;
    Ok(arg.resolve(device))
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
