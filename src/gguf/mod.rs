//! `peft-rs export gguf`: a LoRA adapter, a base model or a merged model as
//! the GGUF files llama.cpp, Ollama and LM Studio load.
//!
//! Names, metadata and layouts follow what llama.cpp's own converters
//! (`convert_lora_to_gguf.py`, `convert_hf_to_gguf.py`) write for these
//! architectures, so that llama.cpp reads our files as it reads theirs; the
//! tests check both against them and against llama.cpp's answers. Tensors
//! are read, merged, converted and written one at a time.

mod experts;
pub mod file;
mod metadata;
mod sentencepiece;
mod vocab;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::models::{self, LlamaConfig, OUTPUT_HEAD};
use crate::weights::WeightFiles;
pub use file::{TensorEntry, TensorType, Value};
use peft_adapters::lora::param::ParamLora;
use peft_adapters::lora::{files, LoraLayer, LoraWeights};
use peft_adapters::LinearAdapter;

/// What to export and where.
pub struct ExportOptions {
    /// The base model directory.
    pub model: PathBuf,
    /// Adapter directories: one alone with `adapter_only` exports it as a
    /// LoRA GGUF; otherwise they are merged into the model.
    pub adapters: Vec<PathBuf>,
    /// Export the adapter itself rather than a merged model.
    pub adapter_only: bool,
    /// The GGUF file to write.
    pub output: PathBuf,
    /// Type of the 2-D tensors (1-D tensors stay f32, as llama.cpp's converters keep them).
    pub outtype: TensorType,
    /// Replace an existing GGUF file at `output`.
    pub overwrite: bool,
    /// Show a progress bar.
    pub progress: bool,
}

/// What an export wrote.
#[derive(Debug)]
pub struct ExportReport {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of the file.
    pub bytes: u64,
    /// Adapter modules whose scaling was folded into `lora_b` (rsLoRA,
    /// `rank_pattern`/`alpha_pattern`: llama.cpp applies one `alpha / r`).
    pub folded_scalings: usize,
    /// llama.cpp's architecture name.
    pub architecture: &'static str,
    /// Warnings the user should read (behaviour llama.cpp does not have).
    pub warnings: Vec<String>,
    /// Wall time.
    pub seconds: f64,
}

/// How llama.cpp names and lays out one architecture.
struct Arch {
    name: &'static str,
    /// HF stores q/k rows for `rotate_half`; llama.cpp's `llama` rotates
    /// interleaved pairs, so its converter permutes those rows.
    permute_qk: bool,
}

/// llama.cpp's architecture for `config`.
fn arch_of(config: &LlamaConfig, dir: &Path) -> Result<Arch> {
    let arch = |name, permute_qk| Arch { name, permute_qk };
    Ok(match config.model_type.as_str() {
        "llama" | "mistral" => arch("llama", true),
        // llama.cpp's Mixtral is its `llama` with experts.
        "mixtral" => arch("llama", true),
        "qwen2" => arch("qwen2", false),
        "qwen3" => arch("qwen3", false),
        "qwen3_moe" => arch("qwen3moe", false),
        "gpt_oss" => arch("gpt-oss", false),
        "phi3" => arch("phi3", false),
        "gemma3" | "gemma3_text" => arch("gemma3", false),
        other => bail!(
            "{}: model_type {other}: export gguf writes llama, mistral, mixtral, phi3, qwen2, qwen3, gemma3, qwen3_moe and gpt_oss models and adapters so far; \
             for this model run `peft-rs merge` and llama.cpp's convert_hf_to_gguf.py on the merged folder",
            dir.join("config.json").display()
        ),
    })
}

/// The adapters' LoRA factors on parameters (`target_parameters`: experts
/// and routers), per parameter path.
type ParamDeltas = BTreeMap<String, ParamLora>;

/// The GGUF name of the module path or tensor name `hf` (`.weight` and
/// `.bias` kept); `None` for tensors llama.cpp does not read.
fn gguf_name(arch: &Arch, config: &LlamaConfig, hf: &str) -> Result<Option<String>> {
    let hf = config.module_name(hf);
    if hf.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    let decoder = &config.decoder_path;
    let (stem, suffix) = match hf.rsplit_once('.') {
        Some((s, x @ ("weight" | "bias"))) => (s, format!(".{x}")),
        _ => (hf.as_str(), String::new()),
    };
    let top = match stem
        .strip_prefix(decoder.as_str())
        .and_then(|r| r.strip_prefix('.'))
    {
        Some("embed_tokens") => Some("token_embd".to_owned()),
        Some("norm") => Some("output_norm".to_owned()),
        _ if stem == OUTPUT_HEAD => Some("output".to_owned()),
        _ => None,
    };
    if let Some(t) = top {
        return Ok(Some(t + &suffix));
    }
    let layer = stem
        .strip_prefix(decoder.as_str())
        .and_then(|r| r.strip_prefix(".layers."))
        .and_then(|r| r.split_once('.'));
    let Some((i, rest)) = layer else {
        bail!("tensor {hf}: no GGUF name for it (not part of a decoder llama.cpp knows)");
    };
    let part = match rest {
        "input_layernorm" => "attn_norm",
        // gpt-oss's norm before its experts and Gemma 3's on the attention
        // output, under llama.cpp's name for them.
        "post_attention_layernorm" if ["gpt-oss", "gemma3"].contains(&arch.name) => {
            "post_attention_norm"
        }
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        // A bare parameter; llama.cpp's converter names it as a weight.
        "self_attn.sinks" => return Ok(Some(format!("blk.{i}.attn_sinks.weight"))),
        // The routers of Qwen3-MoE, Mixtral and gpt-oss.
        "mlp.gate" | "block_sparse_moe.gate" | "mlp.router" => "ffn_gate_inp",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" => "ffn_up",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => bail!("tensor {hf}: no GGUF name for it (not part of a decoder llama.cpp knows)"),
    };
    Ok(Some(format!("blk.{i}.{part}{suffix}")))
}

/// The storage type of the tensor `name` of `shape` under `outtype`, as
/// llama.cpp's converter chooses it: f32 for 1-D tensors (norms, biases,
/// RoPE factors), norms, biases of any shape (gpt-oss's experts') and the
/// routers (`ffn_gate_inp.weight`); q8_0 falls back to f16 for rows that
/// are not whole blocks.
fn storage_type(name: &str, shape: &[usize], outtype: TensorType) -> TensorType {
    let kept_f32 = name.ends_with("_norm.weight")
        || name.ends_with(".ffn_gate_inp.weight")
        || ![".weight", ".lora_a", ".lora_b"]
            .iter()
            .any(|x| name.ends_with(x));
    match shape {
        [] | [_] => TensorType::F32,
        _ if kept_f32 => TensorType::F32,
        [.., row] if !outtype.fits_row(*row) => TensorType::F16,
        _ => outtype,
    }
}

/// HF's q/k rows (per head: the first half of the rotary dimensions, then
/// the second) reordered to llama.cpp's interleaved pairs; `t`'s first
/// dimension is `heads × head_dim`.
fn permute_rows(t: &Tensor, heads: usize) -> Tensor {
    let size = t.size();
    let mut split = vec![heads as i64, 2, size[0] / heads as i64 / 2];
    split.extend_from_slice(&size[1..]);
    t.reshape(split.as_slice())
        .transpose(1, 2)
        .reshape(size.as_slice())
}

/// The number of heads whose rows `gguf` (an `attn_q`/`attn_k` tensor)
/// holds, when the architecture permutes them.
fn permuted_heads(arch: &Arch, c: &LlamaConfig, gguf: &str) -> Option<usize> {
    if !arch.permute_qk {
        return None;
    }
    let part = gguf.split('.').nth(2)?;
    match part {
        "attn_q" => Some(c.num_attention_heads),
        "attn_k" => Some(c.num_key_value_heads),
        _ => None,
    }
}

/// Refuses an output that overlaps an input or, without `overwrite`,
/// exists; replaces only a GGUF file.
fn check_output(opts: &ExportOptions) -> Result<()> {
    let mut inputs = vec![("--model", opts.model.as_path())];
    inputs.extend(opts.adapters.iter().map(|a| ("--adapter", a.as_path())));
    crate::outputs::refuse_overlap("--output", &opts.output, &inputs)?;
    if opts.output.exists() || opts.output.is_symlink() {
        if !opts.overwrite {
            bail!(
                "{}: already exists (choose another --output, or pass --overwrite)",
                opts.output.display()
            );
        }
        if !opts.output.is_file() || !file::is_gguf(&opts.output) {
            bail!(
                "--output {}: exists and is not a GGUF file; --overwrite replaces only a GGUF file",
                opts.output.display()
            );
        }
    }
    if let Some(parent) = opts.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    Ok(())
}

fn display_name(dir: &Path) -> String {
    crate::hub::id_of_snapshot(dir).unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    })
}

/// Writes the GGUF file `opts` describes.
pub fn export(opts: &ExportOptions) -> Result<ExportReport> {
    let start = Instant::now();
    check_output(opts)?;
    let mut report = if opts.adapter_only {
        match opts.adapters.as_slice() {
            [one] => export_adapter(opts, one)?,
            _ => bail!(
                "--adapter-only exports one adapter (got {})",
                opts.adapters.len()
            ),
        }
    } else {
        export_model(opts)?
    };
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

fn progress(shown: bool, total: usize) -> indicatif::ProgressBar {
    if !shown {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template("writing gguf {bar:40} {pos}/{len} tensors")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

fn check_signals(output: &Path) -> Result<()> {
    match crate::signals::pending() {
        Some(sig) => Err(crate::signals::interrupted(sig, |name| {
            format!(
                "stopped by {name} while exporting; nothing was written to {}",
                output.display()
            )
        })),
        None => Ok(()),
    }
}

/// A LoRA adapter as llama.cpp's `convert_lora_to_gguf.py` writes it:
/// `<base tensor>.lora_a` `[r, in]` and `.lora_b` `[out, r]`, one
/// `adapter.lora.alpha`. llama.cpp scales every module by `alpha / r`;
/// where PEFT's scaling differs (rsLoRA, per-module rank or alpha) the
/// ratio is folded into `lora_b`, which gives the same product.
fn export_adapter(opts: &ExportOptions, dir: &Path) -> Result<ExportReport> {
    let config = models::read_config(&opts.model)?;
    let arch = arch_of(&config, &opts.model)?;
    let (lora, weights, params) = read_adapter(&config, dir)?;
    if lora.use_dora {
        bail!(
            "{}: use_dora is true; llama.cpp has no DoRA — merge it (`peft-rs export gguf --model ... --adapter {}` without --adapter-only) to serve it",
            dir.join(files::CONFIG_FILE).display(),
            dir.display()
        );
    }
    let alpha = lora.lora_alpha;
    let mut report = ExportReport {
        tensors: 0,
        bytes: 0,
        folded_scalings: 0,
        architecture: arch.name,
        warnings: metadata::warnings(&config, &arch, &opts.model),
        seconds: 0.0,
    };
    report
        .warnings
        .extend(metadata::unservable(&config, &opts.model));
    // What llama.cpp multiplies B by (alpha / r), against PEFT's scaling:
    // the ratio is folded into B where they differ.
    let mut fold = |scaling: f64, r: i64| {
        let llama_scale = if alpha == 0.0 { 1.0 } else { alpha / r as f64 };
        let ratio = scaling / llama_scale;
        if (ratio - 1.0).abs() > 1e-12 {
            report.folded_scalings += 1;
            ratio
        } else {
            1.0
        }
    };
    let mut tensors = Vec::new();
    for (path, w) in weights {
        let base =
            gguf_name(&arch, &config, &format!("{path}.weight"))?.context("adapter module")?;
        let mut b = &w.b * fold(w.scaling, w.a.size()[0]);
        if let Some(heads) = permuted_heads(&arch, &config, &base) {
            b = permute_rows(&b, heads);
        }
        tensors.push((format!("{base}.lora_a"), w.a));
        tensors.push((format!("{base}.lora_b"), b));
    }
    for (path, l) in &params {
        let ratio = fold(l.scaling, l.rank());
        if l.experts == 1 {
            // A router: plain LoRA on its 2D weight.
            let base = gguf_name(&arch, &config, path)?.context("adapted parameter")?;
            tensors.push((format!("{base}.lora_a"), l.a.shallow_clone()));
            tensors.push((format!("{base}.lora_b"), &l.b * ratio));
        } else {
            tensors.extend(experts::lora_tensors(&config, path, l, ratio)?);
        }
    }
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .map(|(name, t)| {
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            TensorEntry {
                ty: storage_type(name, &shape, opts.outtype),
                name: name.clone(),
                shape,
            }
        })
        .collect();
    let mut kv = metadata::general(&arch, "adapter", &display_name(dir), None);
    kv.push(("adapter.type".into(), Value::Str("lora".into())));
    kv.push(("adapter.lora.alpha".into(), Value::F32(alpha as f32)));
    let mut writer = file::GgufWriter::create(&opts.output, &kv, entries)?;
    for (name, t) in &tensors {
        check_signals(&opts.output)?;
        writer.write(name, t)?;
        report.tensors += 1;
    }
    report.bytes = writer.finish()?;
    Ok(report)
}

/// The base model, or the model with `opts.adapters` merged, as one GGUF
/// with its tokenizer: each tensor read from the memory-mapped checkpoint,
/// merged in fp32, permuted where llama.cpp's layout differs, converted and
/// written before the next is read.
fn export_model(opts: &ExportOptions) -> Result<ExportReport> {
    let base = &opts.model;
    let files_in = WeightFiles::from_model_dir(base)?;
    let config = models::read_config(base)?.with_stored_names(|n| files_in.contains(n));
    let raw = crate::config_json::RawConfig::read(base)?.json;
    let arch = arch_of(&config, base)?;
    metadata::refuse_model(&config, base)?;
    let mut warnings = metadata::warnings(&config, &arch, base);
    let (mut deltas, params) = plan_deltas(&config, &opts.adapters)?;
    let mut left_out = 0;
    // The plan: every tensor llama.cpp reads, the experts by layer.
    let mut plan: Vec<(Source, String, Vec<usize>)> = Vec::new();
    for name in files_in.names() {
        if config.tie_word_embeddings && config.module_name(name) == format!("{OUTPUT_HEAD}.weight")
        {
            continue;
        }
        if experts::is_expert_tensor(&config, name) {
            continue;
        }
        let module = config.module_name(name);
        if !module.starts_with(&format!("{}.", config.decoder_path))
            && !module.starts_with(OUTPUT_HEAD)
        {
            // A multimodal checkpoint's vision tower and projector: llama.cpp
            // reads them from a separate mmproj file.
            left_out += 1;
            continue;
        }
        if let Some(g) = gguf_name(&arch, &config, name)? {
            let (shape, _) = files_in.info(name).expect("listed");
            plan.push((Source::Stored(name.to_owned()), g, shape.to_vec()));
        }
    }
    for (g, shape, part) in experts::tensors(&config) {
        plan.push((Source::Experts(part), g, shape));
    }
    if left_out > 0 {
        warnings.push(format!(
            "{}: {left_out} tensors outside the text model (a vision tower, a projector) are not written; llama.cpp reads them from an mmproj file (convert_hf_to_gguf.py --mmproj)",
            base.display()
        ));
    }
    plan.sort_by_key(|(_, g, _)| gguf_order(g));
    let rope = metadata::rope_factors(&config);
    let mut entries: Vec<TensorEntry> = plan
        .iter()
        .map(|(_, g, shape)| TensorEntry {
            name: g.clone(),
            shape: shape.clone(),
            ty: storage_type(g, shape, opts.outtype),
        })
        .collect();
    for (i, (name, f)) in rope.iter().enumerate() {
        entries.insert(
            i,
            TensorEntry {
                name: name.clone(),
                shape: vec![f.size()[0] as usize],
                ty: TensorType::F32,
            },
        );
    }
    let mut kv = metadata::general(&arch, "model", &display_name(base), Some(opts.outtype));
    kv.extend(metadata::hparams(&arch, &config, &raw));
    kv.extend(vocab::metadata(base, config.vocab_size, arch.name)?);
    let mut writer = file::GgufWriter::create(&opts.output, &kv, entries)?;
    let mut report = ExportReport {
        tensors: 0,
        bytes: 0,
        folded_scalings: 0,
        architecture: arch.name,
        warnings,
        seconds: 0.0,
    };
    for (name, f) in &rope {
        writer.write(name, f)?;
        report.tensors += 1;
    }
    let mut params_done = std::collections::BTreeSet::new();
    let bar = progress(opts.progress, plan.len());
    for (source, g, shape) in &plan {
        check_signals(&opts.output)?;
        let mut t = match source {
            Source::Experts(part) => {
                let t = experts::load(&files_in, &config, *part, &params)?;
                params_done.extend(experts::parameter(&config, *part));
                t
            }
            Source::Stored(name) => {
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                let mut t = files_in.load(name, &dims, Kind::Float, Device::Cpu)?;
                // The copy is ours: the checkpoint's pages can go before it is converted.
                files_in.release(name);
                if let Some(w) = name
                    .strip_suffix(".weight")
                    .and_then(|m| deltas.remove(&config.module_name(m)))
                {
                    LoraLayer::new("merge", w)
                        .merge(&mut t)
                        .with_context(|| name.clone())?;
                }
                // Gemma's norms multiply by 1 + weight; llama.cpp's by the weight.
                if arch.name == "gemma3" && g.ends_with("norm.weight") {
                    t += 1.0;
                }
                // A router adapted as a parameter.
                if let Some((p, _, _)) = config.parameter_part(name) {
                    if let Some(l) = params.get(&p) {
                        t += l.delta();
                        params_done.insert(p);
                    }
                }
                t
            }
        };
        if let Some(heads) = permuted_heads(&arch, &config, g) {
            t = permute_rows(&t, heads);
        }
        writer.write(g, &t)?;
        report.tensors += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(left) = deltas.keys().next() {
        bail!(
            "{}: no tensor {}.weight to merge into",
            base.display(),
            config.stored_name(left)
        );
    }
    if let Some(left) = params.keys().find(|p| !params_done.contains(*p)) {
        bail!("{}: no tensor {left} to merge into", base.display());
    }
    report.bytes = writer.finish()?;
    Ok(report)
}

/// Where a GGUF tensor of a model comes from.
enum Source {
    /// One tensor of the checkpoint, under its stored name.
    Stored(String),
    /// A projection of one layer's experts (see [`experts`]).
    Experts(experts::Part),
}

/// Sort key putting tensors in llama.cpp's converter order: the embedding,
/// then the layers in order, then the final norm and the head.
fn gguf_order(g: &str) -> (usize, usize) {
    match g
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse().ok())
    {
        Some(i) => (1, i),
        None if g.starts_with("token_embd") => (0, 0),
        None => (2, 0),
    }
}

/// The adapter in `dir`, checked against the base `config` (fp32, CPU):
/// its configuration, its linear modules' weights and its parameters' factors.
fn read_adapter(config: &LlamaConfig, dir: &Path) -> Result<files::CheckedAdapter> {
    let adapter = peft_adapters::method::AdapterConfig::read(dir)?;
    if adapter.as_method().is_some() {
        let m = adapter.method();
        bail!(
            "{}: an {m} adapter; llama.cpp has no {m} adapters — merge it first (peft-rs merge) and export the merged model with --model",
            dir.display()
        );
    }
    files::read_checked_plain(
        dir,
        &config.linear_modules(),
        &config.adaptable_parameters(),
        OUTPUT_HEAD,
        config.tie_word_embeddings,
        Device::Cpu,
    )
}

/// The adapters to merge, per module path and per adapted parameter, read
/// and checked against the base.
fn plan_deltas(
    config: &LlamaConfig,
    adapters: &[PathBuf],
) -> Result<(BTreeMap<String, LoraWeights>, ParamDeltas)> {
    let mut out = BTreeMap::new();
    let mut on_params = ParamDeltas::new();
    for dir in adapters {
        let (_, weights, params) = read_adapter(config, dir)?;
        for (path, l) in params {
            if on_params.contains_key(&path) {
                bail!(
                    "{}: {path} is adapted by an earlier --adapter too; merge several adapters into one folder with `peft-rs merge` first",
                    dir.display()
                );
            }
            on_params.insert(path, l);
        }
        for (path, w) in weights {
            if out.contains_key(&path) {
                bail!(
                    "{}: {path} is adapted by an earlier --adapter too; merge several adapters into one folder with `peft-rs merge --adapter-weights` first",
                    dir.display()
                );
            }
            out.insert(path, LoraWeights { dropout: 0.0, ..w });
        }
    }
    Ok((out, on_params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_interleaves_the_rotary_halves_of_each_head() {
        // One head of dimension 4, rows [a0, a1, b0, b1] (rotate_half pairs a_i with b_i).
        let t = Tensor::from_slice(&[0f32, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]).reshape([8, 1]);
        let p = permute_rows(&t, 2);
        let v: Vec<f32> = Vec::try_from(p.reshape([-1])).unwrap();
        assert_eq!(v, vec![0.0, 2.0, 1.0, 3.0, 10.0, 12.0, 11.0, 13.0]);
    }

    #[test]
    fn storage_type_keeps_vectors_f32_and_whole_blocks_for_q8_0() {
        let w = "blk.0.attn_q.weight";
        assert_eq!(storage_type(w, &[64], TensorType::Q8_0), TensorType::F32);
        assert_eq!(
            storage_type(w, &[64, 64], TensorType::Q8_0),
            TensorType::Q8_0
        );
        assert_eq!(
            storage_type(w, &[64, 16], TensorType::Q8_0),
            TensorType::F16
        );
        assert_eq!(
            storage_type(w, &[64, 16], TensorType::BF16),
            TensorType::BF16
        );
        let lora = "blk.0.ffn_up_exps.weight.lora_b";
        assert_eq!(
            storage_type(lora, &[4, 64, 32], TensorType::Q8_0),
            TensorType::Q8_0
        );
        // Routers and biases of any shape stay f32.
        let router = "blk.0.ffn_gate_inp.weight";
        assert_eq!(
            storage_type(router, &[4, 64], TensorType::Q8_0),
            TensorType::F32
        );
        let bias = "blk.0.ffn_up_exps.bias";
        assert_eq!(
            storage_type(bias, &[4, 64], TensorType::BF16),
            TensorType::F32
        );
    }
}
