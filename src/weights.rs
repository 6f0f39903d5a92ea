//! Reading safetensors checkpoints: one file or a sharded set with its index.
//!
//! Files are memory-mapped and each header is validated up front (a truncated
//! file, a header whose offsets point past the end, or an index naming a
//! missing shard is reported before any tensor is built). A tensor is then
//! copied once, from the mapping into libtorch memory, in the dtype and on the
//! device asked for; no second copy of the checkpoint is ever held.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::{MmapMut, MmapOptions};
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};

/// The file name of an unsharded Hugging Face checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index file of a sharded Hugging Face checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    /// Private and copy-on-write: a weight read in place and changed (an
    /// adapter merged into it) gets its own pages; the file never changes.
    mmap: Arc<MmapMut>,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// A set of memory-mapped safetensors files addressed by tensor name.
pub struct WeightFiles {
    shards: Vec<Shard>,
    /// tensor name -> index into `shards`
    location: BTreeMap<String, usize>,
}

impl WeightFiles {
    /// Opens the checkpoint of a Hugging Face model directory:
    /// `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.exists() {
            Self::from_index(&index)
        } else if single.exists() {
            Self::from_files(&[single])
        } else {
            let pickles: Vec<_> = ["pytorch_model.bin", "model.pt"]
                .iter()
                .filter(|f| dir.join(f).exists())
                .collect();
            if !pickles.is_empty() {
                bail!(
                    "{}: only a pickle checkpoint ({}) is there; pickles can run code when loaded, \
                     so peft-rs reads safetensors only (convert with `model.save_pretrained(dir, safe_serialization=True)`)",
                    dir.display(),
                    pickles[0]
                );
            }
            bail!(
                "{}: no {SINGLE_FILE} or {INDEX_FILE} in this directory (is it a Hugging Face model directory?)",
                dir.display()
            );
        }
    }

    /// Opens the shards named by a `model.safetensors.index.json`.
    pub fn from_index(index: &Path) -> Result<Self> {
        let text = peft_adapters::fsio::read_regular_string(
            index,
            peft_adapters::fsio::MAX_JSON_BYTES,
            "weights index",
        )?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
            bail!("{}: no `weight_map` object", index.display());
        };
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = map
            .values()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .with_context(|| {
                format!(
                    "{}: `weight_map` values must be file names",
                    index.display()
                )
            })?;
        files.sort();
        files.dedup();
        for f in &files {
            // Shards live beside the index; a path could read outside the
            // model directory, and two folders could hold the same name.
            if !crate::outputs::is_plain_file_name(f) {
                bail!(
                    "{}: `weight_map` names the shard `{f}`, which is not a plain file name in the model directory",
                    index.display()
                );
            }
            if !dir.join(f).exists() {
                bail!(
                    "{}: the index names shard {f}, which is not in {}",
                    index.display(),
                    dir.display()
                );
            }
        }
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        let set = Self::from_files(&paths)?;
        for (name, file) in map {
            let file = file.as_str().unwrap_or_default();
            match set.location.get(name) {
                Some(&i) if set.shards[i].path.ends_with(file) => {}
                Some(&i) => bail!(
                    "{}: tensor {name} is listed in {file} but found in {}",
                    index.display(),
                    set.shards[i].path.display()
                ),
                None => bail!(
                    "{}: tensor {name} is listed in {file} but that file does not contain it",
                    index.display()
                ),
            }
        }
        Ok(set)
    }

    /// Opens and validates a list of safetensors files.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut location = BTreeMap::new();
        for path in paths {
            let shard = Shard::open(path)?;
            let i = shards.len();
            for name in shard.tensors.keys() {
                if let Some(&j) = location.get(name) {
                    let other: &Shard = &shards[j];
                    bail!(
                        "tensor {name} is in both {} and {}",
                        other.path.display(),
                        path.display()
                    );
                }
                location.insert(name.clone(), i);
            }
            shards.push(shard);
        }
        Ok(Self { shards, location })
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The files, in the order they were opened.
    pub fn paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The file holding a tensor.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.location
            .get(name)
            .map(|&i| self.shards[i].path.as_path())
    }

    /// Shape and dtype of a tensor as recorded in its file header.
    pub fn info(&self, name: &str) -> Option<(&[usize], Dtype)> {
        let &i = self.location.get(name)?;
        let info = &self.shards[i].tensors[name];
        Some((&info.shape, info.dtype))
    }

    /// Builds the tensor `name`, checking its shape, converted to `kind` on `device`.
    pub fn load(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let numel = shape.iter().product();
        Ok(self
            .load_run(name, shape, kind, device, 0..numel)?
            .view(shape))
    }

    /// [`WeightFiles::load`] for a tensor that is only read (a frozen
    /// weight): where it is stored in `kind` and wanted on the CPU, the
    /// tensor is the file's bytes in place, as transformers' memory-mapped
    /// weights are. Nothing is copied: loading costs no time, and the
    /// resident set holds the weight once, as file-backed pages the kernel
    /// can read again. The tensor keeps the mapping alive; a write to it
    /// (an adapter merged in) copies the pages it touches, never the file.
    pub fn load_in_place(
        &self,
        name: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
    ) -> Result<Tensor> {
        let in_place = || {
            let shard = &self.shards[*self.location.get(name)?];
            let info = &shard.tensors[name];
            let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
            let file_kind = kind_of(info.dtype).ok()?;
            if device != Device::Cpu || file_kind != kind || found != shape {
                return None;
            }
            let (s, e) = info.data_offsets;
            let (from, to) = (shard.data_start + s, shard.data_start + e);
            let numel: i64 = shape.iter().product();
            if to - from != numel as usize * kind.elt_size_in_bytes() || to > shard.mmap.len() {
                return None;
            }
            crate::mapped_tensor::tensor_in(&shard.mmap, from, shape, kind)
        };
        match in_place() {
            Some(t) => Ok(t),
            None => self.load(name, shape, kind, device),
        }
    }

    /// Elements `run` of the flattened tensor `name` (which must have
    /// `shape`), converted to `kind` on `device`: only those bytes of the
    /// file are read (a rank's slice of a frozen tensor under `--fsdp`).
    pub fn load_run(
        &self,
        name: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
        run: std::ops::Range<i64>,
    ) -> Result<Tensor> {
        let Some(&i) = self.location.get(name) else {
            let files: Vec<String> = self
                .shards
                .iter()
                .map(|s| s.path.display().to_string())
                .collect();
            bail!("tensor {name} is missing from {}", files.join(", "));
        };
        let shard = &self.shards[i];
        let info = &shard.tensors[name];
        let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if found != shape {
            bail!(
                "{}: tensor {name} has shape {found:?}, but the model config implies {shape:?}",
                shard.path.display()
            );
        }
        let file_kind = kind_of(info.dtype).with_context(|| {
            format!(
                "{}: tensor {name} has dtype {:?}",
                shard.path.display(),
                info.dtype
            )
        })?;
        let elt = file_kind.elt_size_in_bytes();
        let start = shard.data_start + info.data_offsets.0;
        let (from, to) = (
            start + run.start as usize * elt,
            start + run.end as usize * elt,
        );
        if to > shard.data_start + info.data_offsets.1 {
            bail!(
                "{}: tensor {name} is shorter than its shape",
                shard.path.display()
            );
        }
        let host = host_copy(
            &shard.mmap[from..to],
            &[run.end - run.start],
            file_kind,
            device,
        )
        .with_context(|| format!("{}: tensor {name}", shard.path.display()))?;
        // The mapped pages are copied: let them go, so that the resident set
        // holds the model once, not the model and the file it came from.
        release_range(&shard.mmap, from, to);
        // To the device first, then converted there: a bf16 file moves half
        // the bytes of an fp32 model. From page-locked memory the copy is
        // asynchronous; the caching host allocator keeps the block until it is done.
        Ok(host
            .f_to_device_(device, file_kind, device.is_cuda(), false)?
            .to_kind(kind))
    }
}

/// The file's bytes copied once from the mapping into a host tensor: in
/// page-locked memory when `device` is a GPU (the copy to it then runs by
/// DMA, without the staging copy a pageable source costs), in ordinary
/// memory otherwise. The same code on both: only the allocation differs.
pub fn host_copy(bytes: &[u8], shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
    let host = if !device.is_cuda() {
        Tensor::f_empty(shape, (kind, Device::Cpu))?
    } else if let Some(pinned) = crate::mapped_tensor::empty_pinned(shape, kind) {
        pinned.map_err(anyhow::Error::msg)?
    } else {
        Tensor::f_empty(shape, (kind, Device::Cpu))?.f_pin_memory(device)?
    };
    let len = host.numel() * kind.elt_size_in_bytes();
    if len != bytes.len() {
        bail!(
            "{} bytes in the file for a {len}-byte {kind:?} tensor of shape {shape:?}",
            bytes.len()
        );
    }
    if len > 0 {
        // SAFETY: `host` is a fresh contiguous host tensor of exactly `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), host.data_ptr() as *mut u8, len);
        }
    }
    Ok(host)
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let (file, _) = peft_adapters::fsio::open_regular(path, "weights file")?;
        // SAFETY: the mapping is private (writes never reach the file) and the
        // file is not modified while we hold it; every slice taken from it is
        // bounds-checked against the validated header.
        let mmap = unsafe { MmapOptions::new().map_copy(&file) }
            .map(Arc::new)
            .with_context(|| format!("{}: cannot map into memory", path.display()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file ({}); the file is truncated or its header is wrong — re-download or re-save it",
                path.display(),
                describe(&e)
            )
        })?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
        })
    }
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "the data section is shorter or longer than the header says".into()
        }
        E::InvalidHeaderLength => "the header length is larger than the file".into(),
        E::HeaderTooSmall => "the file is shorter than the 8-byte header length".into(),
        E::InvalidOffset(name) => {
            format!("tensor {name} has data offsets outside the data section")
        }
        E::TensorInvalidInfo => "a tensor's shape does not match its byte size".into(),
        other => other.to_string(),
    }
}

pub use peft_adapters::dtype::{dtype_of, kind_of};

/// Writes one safetensors file tensor by tensor: the header is written first
/// from the planned names, dtypes and shapes, then each tensor's bytes in
/// order, so that no more than one tensor is ever held in memory. The file is
/// written under a temporary name and renamed by [`StreamingWriter::finish`].
pub struct StreamingWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: std::io::BufWriter<File>,
    plan: Vec<(String, usize)>,
    next: usize,
}

impl StreamingWriter {
    /// Plans the file: tensors will be written in exactly this order.
    pub fn create(
        path: &Path,
        plan: &[(String, Dtype, Vec<usize>)],
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Self> {
        use std::io::Write;
        let mut header = serde_json::Map::new();
        if let Some(m) = metadata {
            header.insert("__metadata__".into(), serde_json::to_value(m)?);
        }
        let mut offset = 0usize;
        let mut sizes = Vec::with_capacity(plan.len());
        for (name, dtype, shape) in plan {
            let n = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
            );
            offset += n;
            sizes.push((name.clone(), n));
        }
        let mut bytes = serde_json::to_vec(&header)?;
        // Pad with spaces so the data section starts 8-byte aligned, as the
        // reference implementation does.
        while bytes.len() % 8 != 0 {
            bytes.push(b' ');
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut file = std::io::BufWriter::with_capacity(1 << 22, f);
        file.write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|()| file.write_all(&bytes))
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            file,
            plan: sizes,
            next: 0,
        })
    }

    /// Writes the next planned tensor's raw little-endian bytes.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        use std::io::Write;
        let Some((planned, n)) = self.plan.get(self.next) else {
            bail!("{}: tensor {name} was not planned", self.path.display());
        };
        if planned != name || *n != data.len() {
            bail!(
                "{}: expected tensor {planned} of {n} bytes next, got {name} of {} bytes",
                self.path.display(),
                data.len()
            );
        }
        self.file
            .write_all(data)
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.next += 1;
        Ok(())
    }

    /// Syncs and renames the file into place once every tensor is written.
    pub fn finish(self) -> Result<()> {
        use std::io::Write;
        if self.next != self.plan.len() {
            bail!(
                "{}: only {} of {} tensors written",
                self.path.display(),
                self.next,
                self.plan.len()
            );
        }
        let mut file = self.file;
        file.flush()
            .and_then(|()| file.get_ref().sync_all())
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("{}: cannot rename into place", self.path.display()))
    }
}

/// The raw bytes of a tensor (moved to the CPU and made contiguous).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let mut data = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, t.numel())?;
    Ok(data)
}

impl WeightFiles {
    /// The names of the tensors in file `i`, in the order of their data.
    pub fn names_in_file(&self, i: usize) -> Vec<String> {
        let shard = &self.shards[i];
        let mut v: Vec<(&String, usize)> = shard
            .tensors
            .iter()
            .map(|(k, t)| (k, t.data_offsets.0))
            .collect();
        v.sort_by_key(|&(_, o)| o);
        v.into_iter().map(|(k, _)| k.clone()).collect()
    }

    /// Lets the kernel drop the mapped pages of a tensor that has been used,
    /// so that streaming through a checkpoint does not grow the resident set.
    pub fn release(&self, name: &str) {
        let Some(&i) = self.location.get(name) else {
            return;
        };
        let shard = &self.shards[i];
        let (s, e) = shard.tensors[name].data_offsets;
        release_range(&shard.mmap, shard.data_start + s, shard.data_start + e);
    }

    /// The raw bytes of a tensor as stored (no copy: a view of the mapping).
    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        let &i = self.location.get(name)?;
        let shard = &self.shards[i];
        let (s, e) = shard.tensors[name].data_offsets;
        Some(&shard.mmap[shard.data_start + s..shard.data_start + e])
    }
}

/// Lets the kernel drop the whole pages of `mmap[from..to]`.
fn release_range(mmap: &MmapMut, from: usize, to: usize) {
    let page = 4096;
    let start = from.div_ceil(page) * page;
    let end = to / page * page;
    if end > start {
        // SAFETY: the mapping is private and read-only; dropped pages are
        // read back from the file if touched again.
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frozen_weight_is_read_in_place_and_a_write_to_it_stays_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        let w = Tensor::arange(32, (Kind::Float, Device::Cpu))
            .to_kind(Kind::BFloat16)
            .view([4, 8]);
        let plan = vec![("w".to_string(), Dtype::BF16, vec![4, 8])];
        let mut out = StreamingWriter::create(&path, &plan, None).unwrap();
        out.write("w", &tensor_bytes(&w).unwrap()).unwrap();
        out.finish().unwrap();
        let file_before = std::fs::read(&path).unwrap();

        let files = WeightFiles::from_files(std::slice::from_ref(&path)).unwrap();
        let t = files
            .load_in_place("w", &[4, 8], Kind::BFloat16, Device::Cpu)
            .unwrap();
        assert!(t.equal(&w));
        let in_file = files.raw("w").unwrap().as_ptr() as usize;
        if crate::mapped_tensor::AVAILABLE {
            assert_eq!(
                t.data_ptr() as usize,
                in_file,
                "the file's bytes, not a copy"
            );
        }
        // In another dtype it is a converted copy.
        let f = files
            .load_in_place("w", &[4, 8], Kind::Float, Device::Cpu)
            .unwrap();
        assert_ne!(f.data_ptr() as usize, in_file);
        assert!(f.equal(&w.to_kind(Kind::Float)));
        // A wrong shape is refused as `load` refuses it.
        let err = files
            .load_in_place("w", &[8, 4], Kind::BFloat16, Device::Cpu)
            .unwrap_err();
        assert!(format!("{err:#}").contains("has shape [4, 8]"), "{err:#}");

        // The tensor keeps the mapping alive after the files are dropped,
        // and a write to it (a merge) changes neither the file nor what a
        // new reader of it sees.
        drop(files);
        assert!(t.equal(&w));
        let _ = t.shallow_clone().fill_(3.0);
        assert_eq!(t.double_value(&[1, 2]), 3.0);
        assert_eq!(std::fs::read(&path).unwrap(), file_before);
        let again = WeightFiles::from_files(&[path])
            .unwrap()
            .load("w", &[4, 8], Kind::BFloat16, Device::Cpu)
            .unwrap();
        assert!(again.equal(&w));
    }
}
