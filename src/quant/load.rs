//! Quantizing a model's frozen linear layers while it loads (`--quantize`),
//! or reading them already quantized from a transformers checkpoint.
//!
//! As transformers' bitsandbytes integration does, every linear layer of the
//! decoder is quantized; embeddings, norms and the output head (`lm_head`)
//! stay in the model dtype, and `llm_int8_skip_modules` leaves more out.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::checkpoint::{load_4bit, load_int8};
use super::codebook::QuantType;
use super::config::{BnbMode, BnbQuantization};
use super::four_bit::quantize_4bit;
use super::frozen::FrozenWeight;
use super::int8::quantize_int8;
use crate::weights::WeightFiles;

/// `--quantize`: how the frozen linear layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Quantize {
    /// 4-bit NormalFloat (`load_in_4bit=True, bnb_4bit_quant_type="nf4"`), QLoRA's choice.
    Nf4,
    /// 4-bit float (`bnb_4bit_quant_type="fp4"`, transformers' default 4-bit type).
    Fp4,
    /// LLM.int8 row-wise 8-bit (`load_in_8bit=True`).
    Int8,
}

impl Quantize {
    /// The `quantization_config` this asks for: `double_quant` is
    /// `bnb_4bit_use_double_quant`, `compute` `bnb_4bit_compute_dtype`.
    pub fn config(self, double_quant: bool, compute: Kind) -> BnbQuantization {
        let four = |quant_type| BnbMode::FourBit {
            quant_type,
            double_quant,
            compute_dtype: compute,
        };
        let mode = match self {
            Self::Nf4 => four(QuantType::Nf4),
            Self::Fp4 => four(QuantType::Fp4),
            Self::Int8 => BnbMode::EightBit { threshold: 6.0 },
        };
        BnbQuantization {
            mode,
            skip_modules: vec![],
        }
    }
}

/// How a model's linear layers are loaded.
#[derive(Clone, Debug)]
pub struct QuantPlan {
    /// What the layers are (or become).
    pub config: BnbQuantization,
    /// Whether the checkpoint already holds them quantized.
    pub prequantized: bool,
}

/// The output head, which transformers never quantizes.
const OUTPUT_HEAD: &str = "lm_head";

impl QuantPlan {
    /// Decides between the checkpoint's own `quantization_config`
    /// (`stored`) and the one asked for on the command line (`asked`): a
    /// quantized checkpoint loads as it is, and asking for a different
    /// quantization of it is an error.
    pub fn choose(
        stored: Option<BnbQuantization>,
        asked: Option<&BnbQuantization>,
        config_path: &std::path::Path,
    ) -> Result<Option<Self>> {
        Ok(match (stored, asked) {
            (None, None) => None,
            (None, Some(a)) => Some(Self {
                config: a.clone(),
                prequantized: false,
            }),
            (Some(s), a) => {
                if let Some(a) = a {
                    if !same_storage(&s.mode, &a.mode) {
                        bail!(
                            "{}: the checkpoint is already quantized ({}); it cannot be quantized as {} — leave out --quantize or use the unquantized base",
                            config_path.display(),
                            describe(&s.mode),
                            describe(&a.mode)
                        );
                    }
                }
                Some(Self {
                    config: s,
                    prequantized: true,
                })
            }
        })
    }

    /// Whether the module at `path` is quantized.
    pub fn quantizes(&self, path: &str) -> Result<bool> {
        Ok(path != OUTPUT_HEAD && !self.config.skips(path)?)
    }

    /// The frozen weight of the linear layer `prefix` (`[out, in]` =
    /// `shape`): read quantized from `files`, or `dense` (loaded in the
    /// model dtype) quantized here. Returns the names of the checkpoint
    /// tensors it consumed.
    pub fn weight(
        &self,
        prefix: &str,
        shape: &[i64],
        files: Option<&WeightFiles>,
        dense: impl FnOnce() -> Result<Tensor>,
        model_kind: Kind,
        device: Device,
    ) -> Result<(FrozenWeight, Vec<String>)> {
        if self.prequantized {
            let Some(files) = files else {
                bail!("{prefix}: a pre-quantized layer needs checkpoint files");
            };
            let used: Vec<String> = files
                .names()
                .filter(|n| {
                    n.strip_prefix(prefix).is_some_and(|rest| {
                        rest.starts_with(".weight") || rest == ".SCB" || rest == ".weight_format"
                    })
                })
                .map(str::to_owned)
                .collect();
            let w = match &self.config.mode {
                BnbMode::FourBit { compute_dtype, .. } => FrozenWeight::FourBit {
                    q: load_4bit(files, prefix, shape)?.to_device(device),
                    compute: *compute_dtype,
                },
                BnbMode::EightBit { .. } => {
                    let w = load_int8(files, prefix, shape)?;
                    FrozenWeight::Int8 {
                        w: super::Int8Weight {
                            cb: w.cb.to_device(device),
                            scb: w.scb.to_device(device),
                        },
                        compute: model_kind,
                    }
                }
            };
            return Ok((w, used));
        }
        let dense = dense()?;
        let name = format!("{prefix}.weight");
        let at = || match files.and_then(|f| f.file_of(&name)) {
            Some(file) => format!("{}: tensor {name}", file.display()),
            None => format!("tensor {name}"),
        };
        let w = match &self.config.mode {
            BnbMode::FourBit {
                quant_type,
                double_quant,
                compute_dtype,
            } => FrozenWeight::FourBit {
                q: quantize_4bit(&dense, *quant_type, *double_quant).with_context(at)?,
                compute: *compute_dtype,
            },
            BnbMode::EightBit { .. } => FrozenWeight::Int8 {
                w: quantize_int8(&dense).with_context(at)?,
                compute: model_kind,
            },
        };
        Ok((w, vec![format!("{prefix}.weight")]))
    }
}

fn same_storage(a: &BnbMode, b: &BnbMode) -> bool {
    match (a, b) {
        (
            BnbMode::FourBit {
                quant_type: qa,
                double_quant: da,
                ..
            },
            BnbMode::FourBit {
                quant_type: qb,
                double_quant: db,
                ..
            },
        ) => qa == qb && da == db,
        (BnbMode::EightBit { .. }, BnbMode::EightBit { .. }) => true,
        _ => false,
    }
}

/// `nf4 with double quantization`, `int8`, ...
pub fn describe(mode: &BnbMode) -> String {
    match mode {
        BnbMode::FourBit {
            quant_type,
            double_quant,
            ..
        } => format!(
            "{quant_type}{}",
            if *double_quant {
                " with double quantization"
            } else {
                " without double quantization"
            }
        ),
        BnbMode::EightBit { .. } => "int8".to_owned(),
    }
}
