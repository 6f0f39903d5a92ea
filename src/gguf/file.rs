//! The GGUF container (version 3, little-endian), written in one pass:
//! header, metadata, tensor directory, then each tensor's data in directory
//! order, every tensor aligned to 32 bytes. The directory needs only names,
//! shapes and types, so tensors are encoded and written one at a time and a
//! model never has to be in memory whole. The file is written beside its
//! destination under a temporary name and renamed when complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::{Kind, Tensor};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// `general.alignment`'s default, which readers assume when it is absent.
const ALIGNMENT: u64 = 32;
/// Q8_0's block: 32 values sharing one fp16 scale.
const Q8_0_BLOCK: usize = 32;

/// A metadata value (the kinds peft-rs writes).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `UINT32`.
    U32(u32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`.
    Str(String),
    /// `ARRAY` of `STRING`.
    Strs(Vec<String>),
    /// `ARRAY` of `INT32`.
    I32s(Vec<i32>),
    /// `ARRAY` of `FLOAT32`.
    F32s(Vec<f32>),
    /// `ARRAY` of `BOOL`.
    Bools(Vec<bool>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Strs(_) | Value::I32s(_) | Value::F32s(_) | Value::Bools(_) => 9,
        }
    }

    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&self.type_id().to_le_bytes())?;
        match self {
            Value::U32(v) => out.write_all(&v.to_le_bytes()),
            Value::F32(v) => out.write_all(&v.to_le_bytes()),
            Value::Bool(v) => out.write_all(&[u8::from(*v)]),
            Value::Str(s) => write_str(out, s),
            Value::Strs(v) => {
                out.write_all(&8u32.to_le_bytes())?;
                out.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|s| write_str(out, s))
            }
            Value::I32s(v) => {
                out.write_all(&5u32.to_le_bytes())?;
                out.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|x| out.write_all(&x.to_le_bytes()))
            }
            Value::F32s(v) => {
                out.write_all(&6u32.to_le_bytes())?;
                out.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|x| out.write_all(&x.to_le_bytes()))
            }
            Value::Bools(v) => {
                out.write_all(&7u32.to_le_bytes())?;
                out.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|x| out.write_all(&[u8::from(*x)]))
            }
        }
    }
}

fn write_str(out: &mut impl Write, s: &str) -> std::io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

/// A tensor type (ggml's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32 int8 values with one fp16 scale.
    Q8_0,
}

impl TensorType {
    fn ggml_id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q8_0 => 8,
            TensorType::BF16 => 30,
        }
    }

    /// Bytes of `n` values (a Q8_0 row must hold whole blocks).
    fn bytes(self, n: usize) -> usize {
        match self {
            TensorType::F32 => 4 * n,
            TensorType::F16 | TensorType::BF16 => 2 * n,
            TensorType::Q8_0 => n / Q8_0_BLOCK * (2 + Q8_0_BLOCK),
        }
    }

    /// The libtorch dtype a tensor of this type is written from; `None` for
    /// Q8_0, which is quantized by [`quantize_q8_0`].
    fn kind(self) -> Option<Kind> {
        match self {
            TensorType::F32 => Some(Kind::Float),
            TensorType::F16 => Some(Kind::Half),
            TensorType::BF16 => Some(Kind::BFloat16),
            TensorType::Q8_0 => None,
        }
    }

    /// The name `--outtype` uses.
    pub fn name(self) -> &'static str {
        match self {
            TensorType::F32 => "f32",
            TensorType::F16 => "f16",
            TensorType::BF16 => "bf16",
            TensorType::Q8_0 => "q8_0",
        }
    }

    /// Whether a row of `row` values can be stored in this type.
    pub fn fits_row(self, row: usize) -> bool {
        self != TensorType::Q8_0 || row.is_multiple_of(Q8_0_BLOCK)
    }
}

/// `t` (any float dtype) as Q8_0, following ggml's reference quantizer:
/// scale `max|x| / 127` per block of 32, values `x / scale` rounded half away
/// from zero, the scale stored as fp16 before its block.
pub fn quantize_q8_0(t: &Tensor) -> Result<Vec<u8>> {
    let n = t.numel();
    ensure!(
        n.is_multiple_of(Q8_0_BLOCK),
        "q8_0 needs whole blocks of 32 values"
    );
    let blocks = t
        .contiguous()
        .to_kind(Kind::Float)
        .reshape([-1, Q8_0_BLOCK as i64]);
    let d = blocks.abs().amax([1], true) / 127.0;
    let inv = d.reciprocal().where_self(&d.ne(0.0), &d.zeros_like());
    let x = &blocks * inv;
    let q = (x.abs() + 0.5).floor() * x.sign();
    let scales = crate::weights::tensor_bytes(&d.to_kind(Kind::Half))?;
    let values = crate::weights::tensor_bytes(&q.to_kind(Kind::Int8))?;
    let mut out = Vec::with_capacity(TensorType::Q8_0.bytes(n));
    for (s, v) in scales.chunks(2).zip(values.chunks(Q8_0_BLOCK)) {
        out.extend_from_slice(s);
        out.extend_from_slice(v);
    }
    Ok(out)
}

/// One tensor of the directory: its GGUF name, its shape in PyTorch's
/// order (outermost first) and its type.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// The name llama.cpp looks up (`blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape, outermost first (the file stores it reversed).
    pub shape: Vec<usize>,
    /// Storage type.
    pub ty: TensorType,
}

impl TensorEntry {
    fn bytes(&self) -> usize {
        self.ty.bytes(self.shape.iter().product())
    }
}

fn padding(len: u64) -> u64 {
    (ALIGNMENT - len % ALIGNMENT) % ALIGNMENT
}

/// A GGUF file being written: tensors must come in directory order.
pub struct GgufWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
    entries: Vec<TensorEntry>,
    next: usize,
    done: bool,
}

impl GgufWriter {
    /// Writes the header, `metadata` and the directory of `entries` to a
    /// temporary file beside `dest`.
    pub fn create(
        dest: &Path,
        metadata: &[(String, Value)],
        entries: Vec<TensorEntry>,
    ) -> Result<Self> {
        let tmp = peft_adapters::fsio::tmp_path(dest);
        let file =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            tmp,
            dest: dest.to_path_buf(),
            entries,
            next: 0,
            done: false,
        };
        w.write_head(metadata)
            .with_context(|| format!("{}: cannot write", w.tmp.display()))?;
        Ok(w)
    }

    fn write_head(&mut self, metadata: &[(String, Value)]) -> std::io::Result<()> {
        let o = &mut self.out;
        o.write_all(MAGIC)?;
        o.write_all(&VERSION.to_le_bytes())?;
        o.write_all(&(self.entries.len() as u64).to_le_bytes())?;
        o.write_all(&(metadata.len() as u64).to_le_bytes())?;
        let mut len = 24u64;
        let mut counted = Vec::new();
        for (k, v) in metadata {
            counted.clear();
            write_str(&mut counted, k)?;
            v.write(&mut counted)?;
            o.write_all(&counted)?;
            len += counted.len() as u64;
        }
        let mut offset = 0u64;
        for e in &self.entries {
            counted.clear();
            write_str(&mut counted, &e.name)?;
            counted.extend_from_slice(&(e.shape.len() as u32).to_le_bytes());
            for d in e.shape.iter().rev() {
                counted.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            counted.extend_from_slice(&e.ty.ggml_id().to_le_bytes());
            counted.extend_from_slice(&offset.to_le_bytes());
            o.write_all(&counted)?;
            len += counted.len() as u64;
            let bytes = e.bytes() as u64;
            offset += bytes + padding(bytes);
        }
        o.write_all(&vec![0u8; padding(len) as usize])
    }

    /// The next tensor of the directory, as `t` (its values in PyTorch's
    /// layout; converted to the entry's type here).
    pub fn write(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let Some(e) = self.entries.get(self.next) else {
            bail!("GGUF writer: tensor {name} is not in the directory");
        };
        ensure!(
            e.name == name,
            "GGUF writer: expected {}, got {name}",
            e.name
        );
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        ensure!(
            shape.iter().product::<usize>() == e.shape.iter().product::<usize>(),
            "GGUF writer: {name} has shape {shape:?}, the directory says {:?}",
            e.shape
        );
        let len = e.bytes();
        let written = match e.ty.kind() {
            // Written from the tensor's own memory: a big tensor is not copied
            // once more into a byte vector.
            Some(k) => {
                let t = t.to_kind(k).contiguous().to_device(tch::Device::Cpu);
                debug_assert_eq!(t.numel() * t.kind().elt_size_in_bytes(), len);
                // SAFETY: `t` is a contiguous CPU tensor of `len` bytes that
                // lives until the end of this block.
                let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) };
                self.out.write_all(bytes)
            }
            None => {
                let bytes = quantize_q8_0(t).with_context(|| name.to_string())?;
                debug_assert_eq!(bytes.len(), len);
                self.out.write_all(&bytes)
            }
        };
        let pad = padding(len as u64) as usize;
        written
            .and_then(|()| self.out.write_all(&vec![0u8; pad]))
            .with_context(|| format!("{}: cannot write", self.tmp.display()))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the file to its destination; the number
    /// of bytes written.
    pub fn finish(mut self) -> Result<u64> {
        ensure!(
            self.next == self.entries.len(),
            "GGUF writer: {} of {} tensors written",
            self.next,
            self.entries.len()
        );
        self.out
            .flush()
            .and_then(|()| self.out.get_ref().sync_all())
            .with_context(|| format!("{}: cannot write", self.tmp.display()))?;
        let len = self.out.get_ref().metadata()?.len();
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!(
                "{}: cannot rename to {}",
                self.tmp.display(),
                self.dest.display()
            )
        })?;
        self.done = true;
        Ok(len)
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Whether `path` starts as a GGUF file does.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_rounds_half_away_from_zero_with_an_fp16_scale() {
        // max |x| = 127: scale 1, so values are rounded to integers.
        let mut v: Vec<f32> = vec![0.0; 32];
        v[0] = 127.0;
        v[1] = 2.5;
        v[2] = -2.5;
        v[3] = 0.49;
        let bytes = quantize_q8_0(&Tensor::from_slice(&v)).unwrap();
        assert_eq!(bytes.len(), 34);
        assert_eq!(&bytes[..2], &[0x00, 0x3c], "fp16 1.0");
        assert_eq!(bytes[2] as i8, 127);
        assert_eq!(bytes[3] as i8, 3);
        assert_eq!(bytes[4] as i8, -3);
        assert_eq!(bytes[5] as i8, 0);
        // An all-zero block has scale 0 and zero values.
        let zeros = quantize_q8_0(&Tensor::zeros([32], tch::kind::FLOAT_CPU)).unwrap();
        assert!(zeros.iter().all(|&b| b == 0));
    }

    #[test]
    fn directory_offsets_are_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        let entries = vec![
            TensorEntry {
                name: "a".into(),
                shape: vec![3],
                ty: TensorType::F32,
            },
            TensorEntry {
                name: "b".into(),
                shape: vec![2, 32],
                ty: TensorType::Q8_0,
            },
        ];
        let mut w = GgufWriter::create(&path, &[("k".into(), Value::U32(7))], entries).unwrap();
        w.write("a", &Tensor::from_slice(&[1f32, 2.0, 3.0]))
            .unwrap();
        assert!(w.write("a", &Tensor::from_slice(&[1f32])).is_err());
        w.write("b", &Tensor::ones([2, 32], tch::kind::FLOAT_CPU))
            .unwrap();
        let len = w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert!(is_gguf(&path));
        // Data: a (12 bytes, padded to 32), then b (2 blocks of 34 bytes, padded to 96).
        assert_eq!(len % 32, 0);
        let data_start = len as usize - 32 - 96;
        assert_eq!(&bytes[data_start..data_start + 4], &1f32.to_le_bytes());
    }
}
