//! `quantization_config` in config.json: transformers' `BitsAndBytesConfig`
//! (4-bit NF4/FP4 with its compute dtype and double quantization, or
//! LLM.int8), read with its defaults; other quantization methods refused by
//! name.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use tch::Kind;

use super::checkpoint::dtype_named;
use super::codebook::QuantType;
use crate::config_json::RawConfig;

/// What a bitsandbytes `quantization_config` asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum BnbMode {
    /// `load_in_4bit`.
    FourBit {
        /// `bnb_4bit_quant_type` (transformers' default: fp4).
        quant_type: QuantType,
        /// `bnb_4bit_use_double_quant` (default false).
        double_quant: bool,
        /// `bnb_4bit_compute_dtype` (default float32).
        compute_dtype: Kind,
    },
    /// `load_in_8bit`.
    EightBit {
        /// `llm_int8_threshold` (default 6.0): the outlier magnitude above
        /// which activations take the 16-bit path at inference.
        threshold: f64,
    },
}

/// config.json's `quantization_config` for bitsandbytes.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbQuantization {
    /// 4-bit or 8-bit, with its settings.
    pub mode: BnbMode,
    /// `llm_int8_skip_modules`: module names or patterns left unquantized.
    /// Empty when null; transformers then still leaves the output head
    /// (`lm_head`) unquantized.
    pub skip_modules: Vec<String>,
}

/// The quantization methods transformers knows, by `quant_method`, with
/// the names people know them by (for the refusal message).
fn method_name(method: &str) -> &str {
    match method {
        "gptq" => "GPTQ",
        "awq" => "AWQ",
        "aqlm" => "AQLM",
        "quanto" => "Quanto",
        "eetq" => "EETQ",
        "hqq" => "HQQ",
        "compressed-tensors" => "compressed-tensors",
        "fbgemm_fp8" => "FBGEMM FP8",
        "fp8" => "FP8",
        "torchao" => "torchao",
        "bitnet" => "BitNet",
        "vptq" => "VPTQ",
        "spqr" => "SpQR",
        "higgs" => "HIGGS",
        "gguf" => "GGUF",
        "mxfp4" => "MXFP4",
        other => other,
    }
}

impl BnbQuantization {
    /// Reads `quantization_config` from a parsed config.json: `None` when
    /// the model is not quantized.
    pub fn from_config(raw: &RawConfig) -> Result<Option<Self>> {
        match raw.json.get("quantization_config") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Self::from_json(v, &raw.path).map(Some),
        }
    }

    /// Parses a `quantization_config` object; `path` names the file in errors.
    /// Anything but bitsandbytes (GPTQ, AWQ, ...) is refused by name. (Long
    /// on purpose: one field of `BitsAndBytesConfig` after another, each with
    /// transformers' default and its own error.)
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let file = path.display();
        let Value::Object(q) = value else {
            bail!("{file}: field `quantization_config` must be an object, found {value}");
        };
        let field = |k: &str| format!("quantization_config.{k}");
        let method = match q.get("quant_method") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => bail!(
                "{file}: field `{}` must be a string, found {other}",
                field("quant_method")
            ),
            None => bail!(
                "{file}: field `{}` is missing (peft-rs reads bitsandbytes quantization only)",
                field("quant_method")
            ),
        };
        if method != "bitsandbytes" {
            bail!(
                "{file}: field `{}` is `{method}`: {} checkpoints are not supported; peft-rs loads only bitsandbytes 4-bit and 8-bit quantization",
                field("quant_method"),
                method_name(method)
            );
        }
        let flag = |k: &str| -> Result<bool> { bool_field(q, k, &file.to_string()) };
        let four = flag("load_in_4bit")?;
        let eight = flag("load_in_8bit")?;
        let mode = match (four, eight) {
            (true, true) => bail!(
                "{file}: fields `{}` and `{}` are both true",
                field("load_in_4bit"),
                field("load_in_8bit")
            ),
            (false, false) => bail!(
                "{file}: neither `{}` nor `{}` is true",
                field("load_in_4bit"),
                field("load_in_8bit")
            ),
            (true, false) => {
                let quant_type = match str_field(q, "bnb_4bit_quant_type", &file.to_string())? {
                    None => QuantType::Fp4,
                    Some(s) => QuantType::from_name(s).with_context(|| {
                        format!("{file}: field `{}`", field("bnb_4bit_quant_type"))
                    })?,
                };
                let double_quant = flag("bnb_4bit_use_double_quant")?;
                let compute_dtype = match str_field(q, "bnb_4bit_compute_dtype", &file.to_string())?
                {
                    None => Kind::Float,
                    Some(s) => dtype_named(s.trim_start_matches("torch.")).with_context(|| {
                        format!(
                            "{file}: field `{}` is `{s}`; expected float32, float16 or bfloat16",
                            field("bnb_4bit_compute_dtype")
                        )
                    })?,
                };
                if let Some(s) = str_field(q, "bnb_4bit_quant_storage", &file.to_string())? {
                    if s.trim_start_matches("torch.") != "uint8" {
                        bail!(
                            "{file}: field `{}` is `{s}`; only uint8 packed storage is supported",
                            field("bnb_4bit_quant_storage")
                        );
                    }
                }
                BnbMode::FourBit {
                    quant_type,
                    double_quant,
                    compute_dtype,
                }
            }
            (false, true) => {
                if flag("llm_int8_has_fp16_weight")? {
                    bail!(
                        "{file}: field `{}` is true: the weights are not stored in int8",
                        field("llm_int8_has_fp16_weight")
                    );
                }
                let threshold = match q.get("llm_int8_threshold") {
                    None | Some(Value::Null) => 6.0,
                    Some(v) => v.as_f64().with_context(|| {
                        format!(
                            "{file}: field `{}` must be a number, found {v}",
                            field("llm_int8_threshold")
                        )
                    })?,
                };
                BnbMode::EightBit { threshold }
            }
        };
        let skip_modules = match q.get("llm_int8_skip_modules") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .with_context(|| {
                    format!(
                        "{file}: field `{}` must be a list of module names",
                        field("llm_int8_skip_modules")
                    )
                })?,
            Some(other) => bail!(
                "{file}: field `{}` must be a list of module names, found {other}",
                field("llm_int8_skip_modules")
            ),
        };
        Ok(Self { mode, skip_modules })
    }

    /// Whether transformers leaves the module at `path` (e.g.
    /// `model.layers.0.mlp.down_proj`) unquantized because of
    /// `llm_int8_skip_modules`: a pattern matches as a regular expression from
    /// the start up to a module boundary (`layers.1` matches `layers.1.mlp`,
    /// not `layers.11.mlp`), or as a suffix of the path.
    pub fn skips(&self, path: &str) -> Result<bool> {
        for key in &self.skip_modules {
            if path.ends_with(key.as_str()) {
                return Ok(true);
            }
            let re = regex::Regex::new(&format!("^(?:{key})$")).with_context(|| {
                format!("llm_int8_skip_modules: `{key}` is not a valid pattern")
            })?;
            // transformers matches `(?:key)` at the start followed by a
            // boundary (end, a dot next, or a dot just consumed); try every
            // prefix that ends on such a boundary.
            let bytes = path.as_bytes();
            for end in 0..=bytes.len() {
                let boundary =
                    end == bytes.len() || bytes[end] == b'.' || (end > 0 && bytes[end - 1] == b'.');
                if boundary && path.is_char_boundary(end) && re.is_match(&path[..end]) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// A boolean field; transformers writes `load_in_4bit` and a private
/// `_load_in_4bit` copy, either of which may be the only one present.
fn bool_field(q: &Map<String, Value>, key: &str, file: &str) -> Result<bool> {
    let private = format!("_{key}");
    let read = |k: &str| -> Result<Option<bool>> {
        match q.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => bail!(
                "{file}: field `quantization_config.{k}` must be true or false, found {other}"
            ),
        }
    };
    match (read(key)?, read(&private)?) {
        (Some(a), Some(b)) if a != b => bail!(
            "{file}: fields `quantization_config.{key}` ({a}) and `quantization_config.{private}` ({b}) disagree"
        ),
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Ok(false),
    }
}

fn str_field<'a>(q: &'a Map<String, Value>, key: &str, file: &str) -> Result<Option<&'a str>> {
    match q.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => {
            bail!("{file}: field `quantization_config.{key}` must be a string, found {other}")
        }
    }
}

/// Reads `DIR/config.json`'s `quantization_config`, if any.
pub fn read_quantization(model_dir: &Path) -> Result<Option<BnbQuantization>> {
    BnbQuantization::from_config(&RawConfig::read(model_dir)?)
}
