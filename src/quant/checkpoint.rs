//! Pre-quantized checkpoints saved by transformers with bitsandbytes (their
//! `quantization_config` is read by [`super::config`]).
//!
//! A 4-bit linear layer `P` is stored as `P.weight` (uint8, packed codes),
//! `P.weight.absmax`, `P.weight.quant_map`, with double quantization
//! `P.weight.nested_absmax` and `P.weight.nested_quant_map`, and
//! `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a JSON object stored
//! as a uint8 tensor with the quant type, block sizes, dtype, shape and nested
//! offset. An 8-bit layer is `P.weight` (int8), `P.SCB` (f32) and
//! `P.weight_format` (uint8 0 = row-major).

use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::codebook::QuantType;
use super::four_bit::{NestedAbsmax, Quantized4bit, VALID_BLOCKSIZES};
use super::int8::Int8Weight;
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

pub(crate) fn dtype_named(name: &str) -> Option<Kind> {
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
    let state = QuantState::read(files, &weight)?;
    let layout = state.layout(shape)?;
    for t in ["nested_absmax", "nested_quant_map"] {
        let name = format!("{weight}.{t}");
        if !layout.double && files.contains(&name) {
            bail!(
                "{}: tensor {name} is present but {} has no nested_* fields (double quantization)",
                place(files, &name),
                state.name
            );
        }
    }
    let n: i64 = shape.iter().product();
    let data = exact(
        files,
        &weight,
        Dtype::U8,
        &[(n + 1) / 2, 1],
        "two 4-bit codes per byte of the weight",
    )?;
    let absmax_name = format!("{weight}.absmax");
    let absmax = if layout.double {
        let what = "8-bit codes of the block absmax";
        exact(files, &absmax_name, Dtype::U8, &[layout.blocks], what)?
    } else {
        let what = "one f32 absmax per block";
        exact(files, &absmax_name, Dtype::F32, &[layout.blocks], what)?
    };
    let code = exact(
        files,
        &format!("{weight}.quant_map"),
        Dtype::F32,
        &[16],
        "the 4-bit code book",
    )?;
    let nested = match layout.double {
        true => Some(state.nested(files, &weight, layout.blocks)?),
        false => None,
    };
    let q = Quantized4bit {
        data,
        quant_type: state.quant_type,
        blocksize: layout.blocksize,
        absmax,
        code,
        nested,
        shape: shape.to_vec(),
        dtype: layout.dtype,
    };
    q.check(&format!("{}: {weight}", state.file))?;
    Ok(q)
}

/// The JSON quant state transformers saves beside a 4-bit weight
/// (`WEIGHT.quant_state.bitsandbytes__nf4`), with errors that name the
/// file, the tensor and the field.
struct QuantState {
    quant_type: QuantType,
    /// The state tensor's name and file.
    name: String,
    file: String,
    fields: serde_json::Map<String, Value>,
}

/// What a quant state says about the stored tensors.
struct Layout {
    blocksize: i64,
    dtype: Kind,
    blocks: i64,
    double: bool,
}

impl QuantState {
    fn read(files: &WeightFiles, weight: &str) -> Result<Self> {
        let keys: Vec<(QuantType, String)> = [QuantType::Nf4, QuantType::Fp4]
            .into_iter()
            .map(|q| (q, format!("{weight}.quant_state.bitsandbytes__{q}")))
            .filter(|(_, k)| files.contains(k))
            .collect();
        let (quant_type, name) = match keys.as_slice() {
            [one] => one.clone(),
            [] => bail!(
                "{}: tensor {weight} has no {weight}.quant_state.bitsandbytes__nf4 (or __fp4): \
                 not a bitsandbytes 4-bit layer, or its quant state was not saved",
                place(files, weight)
            ),
            _ => bail!(
                "{}: tensor {weight} has both an nf4 and an fp4 quant_state",
                place(files, weight)
            ),
        };
        let file = place(files, &name);
        let Some((qs_shape, qs_dtype)) = files.info(&name) else {
            unreachable!("presence checked above");
        };
        if qs_dtype != Dtype::U8 || qs_shape.len() != 1 {
            bail!("{file}: tensor {name} is {qs_dtype:?} {qs_shape:?}, expected a 1-D uint8 tensor of JSON text");
        }
        let raw = files.raw(&name).unwrap_or_default();
        let json: Value = serde_json::from_slice(raw)
            .with_context(|| format!("{file}: tensor {name} is not JSON text"))?;
        let Value::Object(fields) = json else {
            bail!("{file}: tensor {name} holds JSON that is not an object");
        };
        let state = Self {
            quant_type,
            name,
            file,
            fields,
        };
        if let Some(k) = state
            .fields
            .keys()
            .find(|k| !QUANT_STATE_KEYS.contains(&k.as_str()))
        {
            return Err(state.err(k, "not a bitsandbytes quant_state field".into()));
        }
        Ok(state)
    }

    fn err(&self, field: &str, why: String) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: tensor {}, field `{field}`: {why}",
            self.file,
            self.name
        )
    }

    fn get(&self, field: &str) -> Result<&Value> {
        self.fields
            .get(field)
            .ok_or_else(|| self.err(field, "missing".into()))
    }

    fn int(&self, field: &str) -> Result<i64> {
        let v = self.get(field)?;
        v.as_i64()
            .ok_or_else(|| self.err(field, format!("must be an integer, found {v}")))
    }

    /// The quant type, block size, dtype and shape it states, checked
    /// against the tensor's name and the model config's `shape`.
    fn layout(&self, shape: &[i64]) -> Result<Layout> {
        let named = self.get("quant_type")?;
        if named.as_str() != Some(self.quant_type.name()) {
            return Err(self.err(
                "quant_type",
                format!("is {named}, but the tensor name says {}", self.quant_type),
            ));
        }
        let blocksize = self.int("blocksize")?;
        if !VALID_BLOCKSIZES.contains(&blocksize) {
            return Err(self.err(
                "blocksize",
                format!("{blocksize} is not one bitsandbytes uses ({VALID_BLOCKSIZES:?})"),
            ));
        }
        let dtype_value = self.get("dtype")?;
        let dtype = dtype_value.as_str().and_then(dtype_named).ok_or_else(|| {
            self.err(
                "dtype",
                format!("{dtype_value} is not float32, float16 or bfloat16"),
            )
        })?;
        let stated: Option<Vec<i64>> = self
            .get("shape")?
            .as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect());
        let Some(stated) = stated else {
            return Err(self.err(
                "shape",
                format!("must be a list of integers, found {}", self.fields["shape"]),
            ));
        };
        if stated != shape {
            return Err(self.err(
                "shape",
                format!("is {stated:?}, but the model config implies {shape:?}"),
            ));
        }
        let n: i64 = shape.iter().product();
        if n <= 0 {
            return Err(self.err("shape", format!("{shape:?} has no values")));
        }
        let nested_fields = ["nested_blocksize", "nested_dtype", "nested_offset"];
        let present = nested_fields
            .iter()
            .filter(|f| self.fields.contains_key(**f))
            .count();
        if present != 0 && present != nested_fields.len() {
            let missing = nested_fields
                .iter()
                .find(|f| !self.fields.contains_key(**f))
                .copied()
                .unwrap_or_default();
            return Err(self.err(
                missing,
                "missing while other nested_* fields are present".into(),
            ));
        }
        Ok(Layout {
            blocksize,
            dtype,
            blocks: (n + blocksize - 1) / blocksize,
            double: present != 0,
        })
    }

    /// Double quantization's second level: the nested absmax, its code map
    /// and the offset, for `blocks` first-level blocks.
    fn nested(&self, files: &WeightFiles, weight: &str, blocks: i64) -> Result<NestedAbsmax> {
        let nested_blocksize = self.int("nested_blocksize")?;
        if nested_blocksize <= 0 {
            return Err(self.err(
                "nested_blocksize",
                format!("{nested_blocksize} is not positive"),
            ));
        }
        let nd = self.get("nested_dtype")?;
        if nd.as_str() != Some("float32") {
            return Err(self.err("nested_dtype", format!("is {nd}, expected \"float32\"")));
        }
        let ov = self.get("nested_offset")?;
        let offset = ov
            .as_f64()
            .ok_or_else(|| self.err("nested_offset", format!("must be a number, found {ov}")))?;
        let nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
        let absmax = exact(
            files,
            &format!("{weight}.nested_absmax"),
            Dtype::F32,
            &[nested_blocks],
            "one f32 absmax per nested block",
        )?;
        let code = exact(
            files,
            &format!("{weight}.nested_quant_map"),
            Dtype::F32,
            &[256],
            "the 8-bit dynamic map",
        )?;
        Ok(NestedAbsmax {
            // bitsandbytes reads it back with torch.tensor(float(...)): f32.
            offset: offset as f32,
            absmax,
            code,
            blocksize: nested_blocksize,
        })
    }
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
