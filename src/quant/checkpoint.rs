//! Pre-quantized checkpoints saved by transformers with bitsandbytes, and the
//! `quantization_config` of their config.json.
//!
//! A 4-bit linear layer `P` is stored as `P.weight` (uint8, packed codes),
//! `P.weight.absmax`, `P.weight.quant_map`, with double quantization
//! `P.weight.nested_absmax` and `P.weight.nested_quant_map`, and
//! `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a JSON object stored
//! as a uint8 tensor with the quant type, block sizes, dtype, shape and nested
//! offset. An 8-bit layer is `P.weight` (int8), `P.SCB` (f32) and
//! `P.weight_format` (uint8 0 = row-major).

use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

use super::codebook::QuantType;
use super::four_bit::{NestedAbsmax, Quantized4bit, VALID_BLOCKSIZES};
use super::int8::Int8Weight;
use crate::config_json::RawConfig;
use crate::weights::{kind_of, WeightFiles};

/// Where a tensor lives, for error messages: the file holding it, or all files.
fn place(files: &WeightFiles, name: &str) -> String {
    match files.file_of(name) {
        Some(p) => p.display().to_string(),
        None => files
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Loads `name` onto the CPU after checking that it exists with exactly this
/// dtype and shape (`WeightFiles::load` would convert a wrong dtype silently).
fn exact(
    files: &WeightFiles,
    name: &str,
    dtype: Dtype,
    shape: &[i64],
    why: &str,
) -> Result<Tensor> {
    let Some((found_shape, found_dtype)) = files.info(name) else {
        bail!("{}: tensor {name} is missing ({why})", place(files, name));
    };
    let found: Vec<i64> = found_shape.iter().map(|&d| d as i64).collect();
    if found_dtype != dtype {
        bail!(
            "{}: tensor {name} has dtype {found_dtype:?}, expected {dtype:?} ({why})",
            place(files, name)
        );
    }
    if found != shape {
        bail!(
            "{}: tensor {name} has shape {found:?}, expected {shape:?} ({why})",
            place(files, name)
        );
    }
    files.load(name, shape, kind_of(dtype)?, Device::Cpu)
}

/// The non-tensor fields `QuantState.as_dict(packed=True)` writes into the JSON.
const QUANT_STATE_KEYS: [&str; 7] = [
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
];

fn dtype_named(name: &str) -> Option<Kind> {
    match name {
        "float32" => Some(Kind::Float),
        "float16" => Some(Kind::Half),
        "bfloat16" => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Reads the 4-bit layer `prefix` (e.g. `model.layers.0.self_attn.q_proj`)
/// of a transformers bitsandbytes checkpoint. `shape` is the weight shape the
/// model config implies (`[out, in]`); every tensor and every field of the
/// quant state is checked against it and against each other, and an error
/// names the file, the tensor and the field.
pub fn load_4bit(files: &WeightFiles, prefix: &str, shape: &[i64]) -> Result<Quantized4bit> {
    let weight = format!("{prefix}.weight");
    if !files.contains(&weight) {
        bail!("{}: tensor {weight} is missing", place(files, &weight));
    }
    let keys: Vec<(QuantType, String)> = [QuantType::Nf4, QuantType::Fp4]
        .into_iter()
        .map(|q| (q, format!("{weight}.quant_state.bitsandbytes__{q}")))
        .filter(|(_, k)| files.contains(k))
        .collect();
    let (quant_type, qs_name) = match keys.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "{}: tensor {weight} has no {weight}.quant_state.bitsandbytes__nf4 (or __fp4): \
             not a bitsandbytes 4-bit layer, or its quant state was not saved",
            place(files, &weight)
        ),
        _ => bail!(
            "{}: tensor {weight} has both an nf4 and an fp4 quant_state",
            place(files, &weight)
        ),
    };
    let file = place(files, &qs_name);
    let field_err = |field: &str, why: String| -> anyhow::Error {
        anyhow::anyhow!("{file}: tensor {qs_name}, field `{field}`: {why}")
    };

    let Some((qs_shape, qs_dtype)) = files.info(&qs_name) else {
        unreachable!("presence checked above");
    };
    if qs_dtype != Dtype::U8 || qs_shape.len() != 1 {
        bail!("{file}: tensor {qs_name} is {qs_dtype:?} {qs_shape:?}, expected a 1-D uint8 tensor of JSON text");
    }
    let raw = files.raw(&qs_name).unwrap_or_default();
    let json: Value = serde_json::from_slice(raw)
        .with_context(|| format!("{file}: tensor {qs_name} is not JSON text"))?;
    let Value::Object(state) = json else {
        bail!("{file}: tensor {qs_name} holds JSON that is not an object");
    };
    if let Some(k) = state
        .keys()
        .find(|k| !QUANT_STATE_KEYS.contains(&k.as_str()))
    {
        return Err(field_err(k, "not a bitsandbytes quant_state field".into()));
    }
    let get = |field: &str| -> Result<&Value> {
        state
            .get(field)
            .ok_or_else(|| field_err(field, "missing".into()))
    };
    let int = |field: &str| -> Result<i64> {
        let v = get(field)?;
        v.as_i64()
            .ok_or_else(|| field_err(field, format!("must be an integer, found {v}")))
    };

    let named = get("quant_type")?;
    if named.as_str() != Some(quant_type.name()) {
        return Err(field_err(
            "quant_type",
            format!("is {named}, but the tensor name says {quant_type}"),
        ));
    }
    let blocksize = int("blocksize")?;
    if !VALID_BLOCKSIZES.contains(&blocksize) {
        return Err(field_err(
            "blocksize",
            format!("{blocksize} is not one bitsandbytes uses ({VALID_BLOCKSIZES:?})"),
        ));
    }
    let dtype_value = get("dtype")?;
    let dtype = dtype_value.as_str().and_then(dtype_named).ok_or_else(|| {
        field_err(
            "dtype",
            format!("{dtype_value} is not float32, float16 or bfloat16"),
        )
    })?;
    let stated: Option<Vec<i64>> = get("shape")?
        .as_array()
        .and_then(|a| a.iter().map(Value::as_i64).collect());
    let Some(stated) = stated else {
        return Err(field_err(
            "shape",
            format!("must be a list of integers, found {}", state["shape"]),
        ));
    };
    if stated != shape {
        return Err(field_err(
            "shape",
            format!("is {stated:?}, but the model config implies {shape:?}"),
        ));
    }
    let n: i64 = shape.iter().product();
    if n <= 0 {
        return Err(field_err("shape", format!("{shape:?} has no values")));
    }
    let blocks = (n + blocksize - 1) / blocksize;

    let nested_fields = ["nested_blocksize", "nested_dtype", "nested_offset"];
    let present = nested_fields
        .iter()
        .filter(|f| state.contains_key(**f))
        .count();
    let double = match present {
        0 => false,
        3 => true,
        _ => {
            let missing = nested_fields
                .iter()
                .find(|f| !state.contains_key(**f))
                .copied()
                .unwrap_or_default();
            return Err(field_err(
                missing,
                "missing while other nested_* fields are present".into(),
            ));
        }
    };
    for t in ["nested_absmax", "nested_quant_map"] {
        let name = format!("{weight}.{t}");
        if !double && files.contains(&name) {
            bail!(
                "{}: tensor {name} is present but {qs_name} has no nested_* fields (double quantization)",
                place(files, &name)
            );
        }
    }

    let packed_shape = [(n + 1) / 2, 1];
    let data = exact(
        files,
        &weight,
        Dtype::U8,
        &packed_shape,
        "two 4-bit codes per byte of the weight",
    )?;
    let absmax_name = format!("{weight}.absmax");
    let absmax = if double {
        exact(
            files,
            &absmax_name,
            Dtype::U8,
            &[blocks],
            "8-bit codes of the block absmax",
        )?
    } else {
        exact(
            files,
            &absmax_name,
            Dtype::F32,
            &[blocks],
            "one f32 absmax per block",
        )?
    };
    let code = exact(
        files,
        &format!("{weight}.quant_map"),
        Dtype::F32,
        &[16],
        "the 4-bit code book",
    )?;
    let nested = if double {
        let nested_blocksize = int("nested_blocksize")?;
        if nested_blocksize <= 0 {
            return Err(field_err(
                "nested_blocksize",
                format!("{nested_blocksize} is not positive"),
            ));
        }
        let nd = get("nested_dtype")?;
        if nd.as_str() != Some("float32") {
            return Err(field_err(
                "nested_dtype",
                format!("is {nd}, expected \"float32\""),
            ));
        }
        let ov = get("nested_offset")?;
        let offset = ov
            .as_f64()
            .ok_or_else(|| field_err("nested_offset", format!("must be a number, found {ov}")))?;
        let nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
        let nested_absmax = exact(
            files,
            &format!("{weight}.nested_absmax"),
            Dtype::F32,
            &[nested_blocks],
            "one f32 absmax per nested block",
        )?;
        let nested_code = exact(
            files,
            &format!("{weight}.nested_quant_map"),
            Dtype::F32,
            &[256],
            "the 8-bit dynamic map",
        )?;
        Some(NestedAbsmax {
            // bitsandbytes reads it back with torch.tensor(float(...)): f32.
            offset: offset as f32,
            absmax: nested_absmax,
            code: nested_code,
            blocksize: nested_blocksize,
        })
    } else {
        None
    };
    let q = Quantized4bit {
        data,
        quant_type,
        blocksize,
        absmax,
        code,
        nested,
        shape: shape.to_vec(),
        dtype,
    };
    q.check(&format!("{file}: {weight}"))?;
    Ok(q)
}

/// Reads the 8-bit layer `prefix` of a transformers bitsandbytes checkpoint
/// (`weight` int8 `shape`, `SCB` f32, and `weight_format` 0 when present).
pub fn load_int8(files: &WeightFiles, prefix: &str, shape: &[i64]) -> Result<Int8Weight> {
    if shape.len() != 2 {
        bail!("{prefix}: an int8 layer has an [out, in] weight, not {shape:?}");
    }
    let weight = format!("{prefix}.weight");
    let cb = exact(files, &weight, Dtype::I8, shape, "the int8 codes (CB)")?;
    let scb = exact(
        files,
        &format!("{prefix}.SCB"),
        Dtype::F32,
        &[shape[0]],
        "one f32 scale per row",
    )?;
    let format_name = format!("{prefix}.weight_format");
    if files.contains(&format_name) {
        let f = exact(files, &format_name, Dtype::U8, &[], "the layout code")?;
        let v = f.int64_value(&[]);
        if v != 0 {
            bail!(
                "{}: tensor {format_name} is {v}; only 0 (row-major, what bitsandbytes writes since 0.45) is supported",
                place(files, &format_name)
            );
        }
    }
    let w = Int8Weight { cb, scb };
    w.check(&format!("{}: {weight}", place(files, &weight)))?;
    Ok(w)
}

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
    /// Anything but bitsandbytes (GPTQ, AWQ, ...) is refused by name.
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
