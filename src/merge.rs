//! `peft-rs merge`: fold adapters into the base weights and write a complete
//! Hugging Face model directory that transformers loads as a plain model.
//!
//! The base is streamed tensor by tensor: each tensor is read from the
//! memory-mapped checkpoint, merged in fp32 if an adapter targets it, cast,
//! and written to its place in the output file, so memory stays near the
//! size of the largest tensor. Untouched tensors in an unchanged dtype are
//! copied byte for byte. Everything is written into a temporary directory
//! that is renamed at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::tensor::Dtype;
use tch::{Device, Kind, Tensor};

use crate::models::{self, OUTPUT_HEAD};
use crate::outputs;
use crate::weights::{dtype_of, kind_of, StreamingWriter, WeightFiles, INDEX_FILE, SINGLE_FILE};
use peft_adapters::lora::files;
use peft_adapters::lora::init::loftq;
use peft_adapters::lora::param::ParamLora;
use peft_adapters::lora::{Combination, InitLoraWeights, LoraLayer, LoraWeights};
use peft_adapters::method::AdapterConfig;
use peft_adapters::LinearAdapter;

/// What to merge and where.
pub struct MergeOptions {
    /// The base model directory.
    pub base: PathBuf,
    /// Adapter directories (PEFT format).
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter when several are given (PEFT's `linear` combination).
    pub weights: Vec<f64>,
    /// The output model directory.
    pub output: PathBuf,
    /// Output dtype; `None` keeps each tensor's dtype.
    pub dtype: Option<Kind>,
    /// Replace an existing output directory.
    pub overwrite: bool,
    /// Show a progress bar.
    pub progress: bool,
}

/// What a merge did.
#[derive(Debug)]
pub struct MergeReport {
    /// Base tensors an adapter changed.
    pub tensors_merged: usize,
    /// All tensors written.
    pub tensors_written: usize,
    /// Bytes of tensor data written.
    pub bytes_written: u64,
    /// Size of the largest tensor in the output, in bytes.
    pub largest_tensor_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// What one module folds in: a LoRA delta (several adapters already
/// combined), or the tensors of another method's adapter.
pub(crate) enum Delta {
    /// `scaling·BA` (or DoRA's rescaling).
    Lora(LoraWeights),
    /// `scaling·BA` over LoftQ's base: the weight quantized as LoftQ
    /// quantized it when the adapter was made (`iters` alternations).
    Loftq { weights: LoraWeights, iters: u32 },
    /// An IA³, LoHa, LoKr or VeRA adapter's tensors on module `path`
    /// (`(in, out)` = `dims`), and those its modules share.
    Method {
        config: std::rc::Rc<AdapterConfig>,
        path: String,
        dims: (i64, i64),
        tensors: Vec<Tensor>,
        shared: std::rc::Rc<Vec<Tensor>>,
    },
}

impl Delta {
    /// The base weight `t` (fp32) as the adapter applies over it: LoftQ's
    /// quantized Q, made again; the weight itself for every other adapter.
    fn base_for(&self, t: &mut Tensor) -> Result<()> {
        if let Self::Loftq { weights, iters } = self {
            let r = weights.rank();
            *t = loftq(t, r, *iters, crate::peft_model::nf4_roundtrip)?.residual;
        }
        Ok(())
    }

    /// A fresh, unmerged layer of this delta: each tensor it changes (the
    /// weight, and IA³'s bias) is merged by its own copy, in any order.
    fn layer(&self) -> Box<dyn LinearAdapter> {
        match self {
            Self::Lora(w) | Self::Loftq { weights: w, .. } => Box::new(LoraLayer::new(
                "merge",
                LoraWeights {
                    a: w.a.shallow_clone(),
                    b: w.b.shallow_clone(),
                    magnitude: w.magnitude.as_ref().map(Tensor::shallow_clone),
                    scaling: w.scaling,
                    dropout: 0.0,
                },
            )),
            Self::Method {
                config,
                path,
                dims,
                tensors,
                shared,
            } => config.as_method().expect("not LoRA").layer(
                path,
                *dims,
                "merge",
                tensors.iter().map(Tensor::shallow_clone).collect(),
                shared,
            ),
        }
    }
}

/// The adapters' LoRA factors on parameters (`target_parameters`: experts
/// and routers), per parameter path.
type ParamDeltas = BTreeMap<String, ParamLora>;

/// The adapters, read and checked against the base: the deltas per module
/// path, and those on parameters.
fn plan_deltas(base: &Path, opts: &MergeOptions) -> Result<(BTreeMap<String, Delta>, ParamDeltas)> {
    let config = models::read_config(base)?;
    let modules = config.linear_modules();
    let mut per_module: BTreeMap<String, Vec<(LoraWeights, f64)>> = BTreeMap::new();
    let mut params = ParamDeltas::new();
    for (i, dir) in opts.adapters.iter().enumerate() {
        let adapter = AdapterConfig::read(dir)?;
        if adapter.as_method().is_some() {
            if opts.adapters.len() > 1 {
                bail!(
                    "{}: an {} adapter is merged alone (--weights combines LoRA adapters only)",
                    dir.display(),
                    adapter.method()
                );
            }
            return Ok((
                method_deltas(dir, adapter, &modules, config.tie_word_embeddings)?,
                params,
            ));
        }
        let (lora, weights, on_params) = files::read_checked_with_params(
            dir,
            &modules,
            &config.adaptable_parameters(),
            OUTPUT_HEAD,
            config.tie_word_embeddings,
            Device::Cpu,
        )?;
        if !on_params.is_empty() && opts.adapters.len() > 1 {
            bail!(
                "{}: an adapter on parameters (`target_parameters`) is merged alone (--weights combines adapters of linear modules only)",
                dir.display()
            );
        }
        params.extend(on_params);
        files::refuse_unconverted(dir, lora.init_lora_weights)?;
        if let InitLoraWeights::Loftq { iters } = lora.init_lora_weights {
            if opts.adapters.len() > 1 {
                bail!(
                    "{}: a LoftQ adapter applies over its own quantized base and is merged alone (--weights combines adapters of one base)",
                    dir.display()
                );
            }
            let loftq = weights
                .into_iter()
                .map(|(path, w)| {
                    let weights = LoraWeights { dropout: 0.0, ..w };
                    (path, Delta::Loftq { weights, iters })
                })
                .collect();
            return Ok((loftq, params));
        }
        for (path, w) in weights {
            // Merging is inference: no dropout.
            let w = LoraWeights { dropout: 0.0, ..w };
            per_module
                .entry(path)
                .or_default()
                .push((w, opts.weights.get(i).copied().unwrap_or(1.0)));
        }
    }
    let deltas = per_module
        .into_iter()
        .map(|(path, parts)| {
            let w = if opts.weights.is_empty() {
                parts.into_iter().next().expect("one adapter").0
            } else {
                let refs: Vec<(&LoraWeights, f64)> = parts.iter().map(|(w, x)| (w, *x)).collect();
                LoraWeights::combine(&refs, Combination::Linear).with_context(|| path.clone())?
            };
            Ok((path, Delta::Lora(w)))
        })
        .collect::<Result<_>>()?;
    Ok((deltas, params))
}

/// The adapter in `dir` (of a method other than LoRA, configuration
/// `adapter`) as per-module deltas, checked against the base's linear `modules`.
fn method_deltas(
    dir: &Path,
    adapter: AdapterConfig,
    modules: &[(String, i64, i64)],
    tied_head: bool,
) -> Result<BTreeMap<String, Delta>> {
    let method = adapter.as_method().expect("not LoRA");
    let paths: Vec<&str> = modules.iter().map(|(p, _, _)| p.as_str()).collect();
    let config_file = dir.join(files::CONFIG_FILE);
    let chosen = method
        .select(&paths, OUTPUT_HEAD)
        .with_context(|| config_file.display().to_string())?;
    if tied_head && chosen.contains(&OUTPUT_HEAD) {
        bail!("{}: targets {OUTPUT_HEAD}, which shares its weight with model.embed_tokens in this base model", config_file.display());
    }
    let adapted: Vec<(String, i64, i64)> = modules
        .iter()
        .filter(|(p, _, _)| chosen.contains(&p.as_str()))
        .cloned()
        .collect();
    let read = peft_adapters::method::read_tensors(dir, method, &adapted)?;
    let config = std::rc::Rc::new(adapter.clone());
    let shared = std::rc::Rc::new(read.shared);
    let mut per_module = read.modules;
    Ok(adapted
        .into_iter()
        .map(|(p, i, o)| {
            let d = Delta::Method {
                config: config.clone(),
                path: p.clone(),
                dims: (i, o),
                tensors: per_module.remove(&p).expect("read"),
                shared: shared.clone(),
            };
            (p, d)
        })
        .collect())
}

/// Merges and writes the output directory: refuses an output that overlaps
/// an input or that peft-rs did not write, holds a lock beside the output,
/// writes into a temporary directory and publishes it in one rename (an
/// atomic exchange when replacing an earlier merge).
pub fn merge_to_dir(opts: &MergeOptions) -> Result<MergeReport> {
    let start = Instant::now();
    crate::peft_model::check_adapter_weights(opts.adapters.len(), &opts.weights)?;
    let base = &opts.base;
    let mut inputs = vec![("base model", base.as_path())];
    inputs.extend(opts.adapters.iter().map(|a| ("adapter", a.as_path())));
    outputs::refuse_overlap("--output", &opts.output, &inputs)?;
    let name = opts
        .output
        .file_name()
        .context("--output needs a directory name")?
        .to_string_lossy()
        .into_owned();
    let parent = opts
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("{}: cannot create", parent.display()))?;
    let _lock = outputs::OutputLock::acquire(&parent.join(format!(".{name}.lock")), &opts.output)?
        .remove_on_drop();
    if opts.output.exists() || opts.output.is_symlink() {
        if !opts.overwrite {
            bail!(
                "{}: already exists (choose another --output, or pass --overwrite)",
                opts.output.display()
            );
        }
        if !opts.output.is_dir() || !outputs::is_ours(&opts.output, "merge") {
            bail!(
                "--output {}: exists and was not written by peft-rs merge; --overwrite replaces only an earlier merge — remove it yourself or choose another --output",
                opts.output.display()
            );
        }
    }
    let (mut deltas, params) = plan_deltas(base, opts)?;
    let files_in = WeightFiles::from_model_dir(base)?;
    // Holding the lock, any temporary of this output is a killed run's.
    outputs::remove_temporaries(parent, &format!("{name}.tmp-"))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    // Every merged tensor takes fresh fp32 and output-dtype buffers of the
    // same few sizes; kept, their pages are not faulted in and zeroed again
    // for each (at 8B the kernel's page clearing and faults were half of the
    // merge's CPU time).
    let keep_pages = crate::memory::KeepFreedPages::new();
    let result = write_model(base, &files_in, &mut deltas, &params, &tmp, opts)
        .and_then(|r| outputs::mark(&tmp, "merge").map(|()| r));
    drop(keep_pages);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    outputs::publish_dir(&tmp, &opts.output)?;
    Ok(MergeReport {
        seconds: start.elapsed().as_secs_f64(),
        ..report
    })
}

/// The layers of a bitsandbytes checkpoint that are stored quantized, by
/// module path, with their `[out, in]` shape and whether they are 4-bit.
struct QuantizedLayers {
    layers: BTreeMap<String, (Vec<i64>, bool)>,
}

impl QuantizedLayers {
    fn read(base: &Path, files: &WeightFiles) -> Result<Option<Self>> {
        let Some(q) = crate::quant::read_quantization(base)? else {
            return Ok(None);
        };
        let four_bit = matches!(q.mode, crate::quant::BnbMode::FourBit { .. });
        let plan = crate::quant::QuantPlan {
            config: q,
            prequantized: true,
        };
        let config = models::read_config(base)?.with_stored_names(|n| files.contains(n));
        let mut layers = BTreeMap::new();
        for (path, i, o) in config.linear_modules() {
            let path = config.stored_name(&path);
            if plan.quantizes(&path)? && files.contains(&format!("{path}.weight")) {
                layers.insert(path, (vec![o, i], four_bit));
            }
        }
        Ok(Some(Self { layers }))
    }

    /// The quantized module whose auxiliary tensor (`absmax`, `quant_map`,
    /// `nested_*`, `quant_state.*`, `SCB`, `weight_format`) `name` is.
    fn is_auxiliary(&self, name: &str) -> bool {
        self.layers.keys().any(|m| {
            name.strip_prefix(m.as_str()).is_some_and(|rest| {
                (rest.starts_with(".weight.") && rest != ".weight")
                    || rest == ".SCB"
                    || rest == ".weight_format"
            })
        })
    }

    /// The weight of quantized module `module`, dequantized as bitsandbytes
    /// does into its original dtype, then in fp32; and that dtype.
    /// The dtype `module`'s dequantized weight is written in (the 4-bit
    /// state's original dtype; fp32 for int8), read without dequantizing.
    fn output_kind(&self, files: &WeightFiles, module: &str) -> Result<Option<Kind>> {
        let Some((shape, four_bit)) = self.layers.get(module) else {
            return Ok(None);
        };
        Ok(Some(if *four_bit {
            crate::quant::load_4bit(files, module, shape)?.dtype
        } else {
            Kind::Float
        }))
    }

    fn dequantize(&self, files: &WeightFiles, module: &str) -> Result<Option<(Tensor, Kind)>> {
        let Some((shape, four_bit)) = self.layers.get(module) else {
            return Ok(None);
        };
        Ok(Some(if *four_bit {
            let q = crate::quant::load_4bit(files, module, shape)?;
            (
                q.dequantize(q.dtype, Device::Cpu).to_kind(Kind::Float),
                q.dtype,
            )
        } else {
            let w = crate::quant::load_int8(files, module, shape)?;
            (w.dequantize(Kind::Float, Device::Cpu), Kind::Float)
        }))
    }
}

fn write_model(
    base: &Path,
    files_in: &WeightFiles,
    deltas: &mut BTreeMap<String, Delta>,
    params: &ParamDeltas,
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let bar = progress(opts.progress, files_in.names().count());
    let mut report = MergeReport {
        tensors_merged: 0,
        tensors_written: 0,
        bytes_written: 0,
        largest_tensor_bytes: 0,
        seconds: 0.0,
    };
    let mut weight_map = serde_json::Map::new();
    // The modules whose weight was merged (their bias may come later).
    let mut done: Vec<String> = Vec::new();
    let mut params_done = std::collections::BTreeSet::new();
    // A bitsandbytes base: its quantized layers are written dequantized
    // (merged where an adapter targets them), as PEFT's merge_and_unload
    // followed by transformers' dequantize() gives, without re-quantizing.
    let quantized = QuantizedLayers::read(base, files_in)?;
    let config = models::read_config(base)?.with_stored_names(|n| files_in.contains(n));
    for (i, path) in files_in.paths().iter().enumerate() {
        let file_name = path
            .file_name()
            .context("shard name")?
            .to_string_lossy()
            .into_owned();
        let plan = shard_plan(files_in, i, quantized.as_ref(), opts)?;
        let mut writer = StreamingWriter::create(
            &out.join(&file_name),
            &plan,
            Some([("format".to_owned(), "pt".to_owned())].into()),
        )?;
        for (n, out_dtype, shape) in &plan {
            if let Some(sig) = crate::signals::pending() {
                return Err(crate::signals::interrupted(sig, |name| {
                    format!(
                        "stopped by {name} while merging; nothing was written to {}",
                        opts.output.display()
                    )
                }));
            }
            // Adapters name modules by their paths, which a multimodal
            // checkpoint may store under other names.
            let (module, is_bias) = match (n.strip_suffix(".weight"), n.strip_suffix(".bias")) {
                (Some(m), _) => (Some(config.module_name(m)), false),
                (_, Some(m)) => (Some(config.module_name(m)), true),
                _ => (None, false),
            };
            let delta = module.as_ref().and_then(|m| deltas.get(m));
            // An adapted parameter, whole or one expert's part of it.
            let part = config
                .parameter_part(n)
                .and_then(|(p, e, rows)| params.get(&p).map(|l| (p, e, rows, l)));
            let merged = match (part, delta) {
                (Some((p, e, rows, l)), _) => {
                    let d = match e {
                        Some(e) => l.expert_delta(e, rows),
                        None => l.delta(),
                    };
                    let mut change = |t: &mut Tensor| {
                        *t += &d;
                        Ok(())
                    };
                    report.tensors_merged += 1;
                    params_done.insert(p);
                    merged_tensor(
                        files_in,
                        quantized.as_ref(),
                        n,
                        *out_dtype,
                        shape,
                        Some(&mut change),
                    )?
                }
                (None, delta) => match delta {
                    // A bias changes only under a method that scales outputs (IA³).
                    Some(d) if is_bias => {
                        let layer = d.layer();
                        let mut change = |t: &mut Tensor| layer.merge_bias(t);
                        merged_tensor(
                            files_in,
                            quantized.as_ref(),
                            n,
                            *out_dtype,
                            shape,
                            Some(&mut change),
                        )?
                    }
                    Some(d) => {
                        let mut layer = d.layer();
                        let mut change = |t: &mut Tensor| {
                            d.base_for(t)?;
                            layer.merge(t)
                        };
                        report.tensors_merged += 1;
                        let m = merged_tensor(
                            files_in,
                            quantized.as_ref(),
                            n,
                            *out_dtype,
                            shape,
                            Some(&mut change),
                        )?;
                        done.push(module.clone().expect("a module"));
                        m
                    }
                    None => {
                        merged_tensor(files_in, quantized.as_ref(), n, *out_dtype, shape, None)?
                    }
                },
            };
            let bytes: &[u8] = match &merged {
                // SAFETY: a contiguous CPU tensor ([`merged_tensor`]) of
                // numel values, alive and unchanged while its bytes are written.
                Some(t) => unsafe {
                    std::slice::from_raw_parts(
                        t.data_ptr() as *const u8,
                        t.numel() * t.kind().elt_size_in_bytes(),
                    )
                },
                None => files_in.raw(n).expect("listed"),
            };
            report.largest_tensor_bytes = report.largest_tensor_bytes.max(bytes.len() as u64);
            report.bytes_written += bytes.len() as u64;
            writer.write(n, bytes)?;
            files_in.release(n);
            report.tensors_written += 1;
            weight_map.insert(n.clone(), file_name.clone().into());
            bar.inc(1);
        }
        writer.finish()?;
    }
    bar.finish_and_clear();
    if let Some(left) = params.keys().find(|p| !params_done.contains(*p)) {
        bail!("{}: no tensor holds {left} to merge into", base.display());
    }
    if let Some(left) = deltas.keys().find(|m| !done.contains(m)) {
        bail!(
            "{}: no tensor {}.weight to merge into",
            base.display(),
            config.stored_name(left)
        );
    }
    if base.join(INDEX_FILE).exists() {
        let index = serde_json::json!({
            "metadata": {"total_size": report.bytes_written},
            "weight_map": weight_map,
        });
        peft_adapters::fsio::write_atomic(
            &out.join(INDEX_FILE),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
    } else {
        debug_assert!(out.join(SINGLE_FILE).exists());
    }
    copy_other_files(base, out, opts.dtype, quantized.is_some())?;
    Ok(report)
}

/// The merge's progress bar over `total` tensors (hidden without a terminal).
fn progress(shown: bool, total: usize) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total as u64);
    b.set_style(
        ProgressStyle::with_template("merging {bar:40} {pos}/{len} tensors {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

/// The tensors shard `i` of the output holds, with their dtype and shape:
/// those of the base, a quantized layer as its dequantized weight (without
/// its quantization state), float tensors in `--dtype` when given.
fn shard_plan(
    files_in: &WeightFiles,
    i: usize,
    quantized: Option<&QuantizedLayers>,
    opts: &MergeOptions,
) -> Result<Vec<(String, Dtype, Vec<usize>)>> {
    files_in
        .names_in_file(i)
        .into_iter()
        .filter(|n| !quantized.is_some_and(|q| q.is_auxiliary(n)))
        .map(|n| {
            let module = n.strip_suffix(".weight").unwrap_or("");
            if let Some((shape, _)) = quantized.and_then(|q| q.layers.get(module)) {
                let kind = match opts.dtype {
                    Some(k) => k,
                    None => quantized
                        .and_then(|q| q.output_kind(files_in, module).transpose())
                        .transpose()?
                        .unwrap_or(Kind::Float),
                };
                let shape = shape.iter().map(|&d| d as usize).collect();
                return Ok((n.clone(), dtype_of(kind)?, shape));
            }
            let (shape, dtype) = files_in.info(&n).expect("listed");
            let out_dtype = match (opts.dtype, dtype) {
                (Some(k), Dtype::F32 | Dtype::F16 | Dtype::BF16) => dtype_of(k)?,
                _ => dtype,
            };
            Ok((n.clone(), out_dtype, shape.to_vec()))
        })
        .collect()
}

/// A change made to a base tensor in fp32 (an adapter merged into it).
type TensorChange<'a> = dyn FnMut(&mut Tensor) -> Result<()> + 'a;

/// Tensor `n` as the output holds it (contiguous, on the CPU): dequantized
/// (a quantized layer), with `delta` merged in (in fp32), converted to
/// `out_dtype` and checked finite there; `None` when the base's bytes are
/// written as they are.
fn merged_tensor(
    files_in: &WeightFiles,
    quantized: Option<&QuantizedLayers>,
    n: &str,
    out_dtype: Dtype,
    shape: &[usize],
    change: Option<&mut TensorChange>,
) -> Result<Option<Tensor>> {
    let (_, in_dtype) = files_in.info(n).expect("listed");
    let dequantized = match (quantized, n.strip_suffix(".weight")) {
        (Some(q), Some(m)) => q.dequantize(files_in, m)?.map(|(t, _)| t),
        _ => None,
    };
    if dequantized.is_none() && change.is_none() && out_dtype == in_dtype {
        return Ok(None);
    }
    let mut t = match dequantized {
        Some(t) => t,
        None => {
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            files_in.load(n, &shape, Kind::Float, Device::Cpu)?
        }
    };
    if let Some(change) = change {
        change(&mut t).with_context(|| n.to_string())?;
    }
    // Written from the tensor's own bytes, not a copy of them.
    Ok(Some(
        finite_in(&t, kind_of(out_dtype)?, n)?
            .to_device(Device::Cpu)
            .contiguous(),
    ))
}

/// `t` converted to the output dtype `kind`, refused when a value is not
/// finite there (PEFT's safe_merge checks before the cast; the cast itself
/// turns fp16 values beyond ±65504 into infinities). `name` is the tensor.
fn finite_in(t: &Tensor, kind: Kind, name: &str) -> Result<Tensor> {
    let out = t.to_kind(kind);
    if bool::try_from(out.isfinite().all())? {
        return Ok(out);
    }
    let before = t.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
    let after = out
        .isfinite()
        .logical_not()
        .sum(Kind::Int64)
        .int64_value(&[]);
    if before > 0 {
        bail!("merged tensor {name} holds {before} NaN or infinite values; the adapter or the base (its quantization state?) is broken");
    }
    bail!(
        "merged tensor {name}: {after} values overflow {} (|w| above {}); write it with --dtype bf16 (fp32's range) or fp32",
        crate::device::dtype_name(kind),
        if kind == Kind::Half { "65504" } else { "the dtype's largest value" }
    )
}

/// Copies config, tokenizer and generation files; records the new dtype in
/// config.json, and drops its `quantization_config` when the base was
/// quantized (the output is not).
fn copy_other_files(base: &Path, out: &Path, dtype: Option<Kind>, dequantized: bool) -> Result<()> {
    for entry in
        std::fs::read_dir(base).with_context(|| format!("{}: cannot list", base.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors")
            || name == INDEX_FILE
            || name.ends_with(".bin")
            || name.ends_with(".pt");
        // Follow symlinks: the Hugging Face cache's snapshot folders are made of them.
        let is_file = std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file());
        if is_weights || !is_file || name.starts_with('.') {
            continue;
        }
        if name == "config.json" {
            let text = peft_adapters::fsio::read_regular_string(
                &entry.path(),
                peft_adapters::fsio::MAX_JSON_BYTES,
                "model config",
            )?;
            let mut cfg: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", entry.path().display()))?;
            if let (true, Some(obj)) = (dequantized, cfg.as_object_mut()) {
                obj.remove("quantization_config");
            }
            if let (Some(k), Some(obj)) = (dtype, cfg.as_object_mut()) {
                let s = match k {
                    Kind::BFloat16 => "bfloat16",
                    Kind::Half => "float16",
                    _ => "float32",
                };
                obj.insert("dtype".into(), s.into());
                if obj.contains_key("torch_dtype") {
                    obj.insert("torch_dtype".into(), s.into());
                }
            }
            peft_adapters::fsio::write_atomic(
                &out.join(&name),
                serde_json::to_string_pretty(&cfg)?.as_bytes(),
            )?;
        } else {
            std::fs::copy(entry.path(), out.join(&name))
                .with_context(|| format!("{}: cannot copy", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Questions `merge --verify` asks both models (as chat turns where the
/// model has a chat template).
const VERIFY_PROMPTS: [&str; 16] = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in one sentence.",
    "List the first five prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Suggest a name for a coffee shop.",
    "Summarize the plot of Romeo and Juliet.",
    "How do I boil an egg?",
    "Name two renewable sources of energy.",
    "Write a Python function that reverses a string.",
    "What does a compiler do?",
    "Give an example of a metaphor.",
];

/// How close a merged model is to its base with the adapters applied.
#[derive(Debug)]
pub struct Verification {
    /// Prompts compared.
    pub prompts: usize,
    /// Positions compared (all prompt tokens).
    pub positions: usize,
    /// Largest |logit difference| over all positions and the vocabulary.
    pub max_abs_diff: f64,
    /// Largest |logit| of the unmerged model, for scale.
    pub max_abs_logit: f64,
    /// Positions where both models pick the same next token.
    pub same_argmax: usize,
}

/// `merge --verify N`: the logits of `merged` against those of `base` with
/// `adapters` applied (combined with `weights`), both in fp32 on the CPU,
/// on the first `n` of [`VERIFY_PROMPTS`]. Both models are in memory at once.
pub fn verify(
    base: &Path,
    adapters: &[PathBuf],
    weights: &[f64],
    merged: &Path,
    n: usize,
) -> Result<Verification> {
    if n == 0 || n > VERIFY_PROMPTS.len() {
        bail!(
            "--verify {n}: give a number of prompts from 1 to {}",
            VERIFY_PROMPTS.len()
        );
    }
    let mut unmerged = models::Pretrained::load(base, Kind::Float, Device::Cpu)?;
    crate::peft_model::load_adapters(&mut unmerged.model, adapters, weights)?;
    let merged = models::load(merged, Kind::Float, Device::Cpu)?;
    let mut v = Verification {
        prompts: n,
        positions: 0,
        max_abs_diff: 0.0,
        max_abs_logit: 0.0,
        same_argmax: 0,
    };
    for p in &VERIFY_PROMPTS[..n] {
        let tok = &unmerged.tokenizer;
        let ids = if tok.has_chat_template() {
            tok.encode_chat(&[crate::tokenizer::Message::user(*p)], true)?
        } else {
            tok.encode(p, true)?
        };
        let ids =
            Tensor::from_slice(&ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>()).unsqueeze(0);
        let (a, b) = tch::no_grad(|| (unmerged.model.forward(&ids), merged.forward(&ids)));
        v.positions += ids.size()[1] as usize;
        v.max_abs_diff = v.max_abs_diff.max((&a - &b).abs().max().double_value(&[]));
        v.max_abs_logit = v.max_abs_logit.max(a.abs().max().double_value(&[]));
        v.same_argmax += a
            .argmax(-1, false)
            .eq_tensor(&b.argmax(-1, false))
            .sum(Kind::Int64)
            .int64_value(&[]) as usize;
    }
    Ok(v)
}
