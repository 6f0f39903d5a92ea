//! PEFT's adapter directory: `adapter_config.json` and
//! `adapter_model.safetensors` (metadata `{"format": "pt"}`), with keys such as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, View};
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};

/// The adapter configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before module paths (`PeftModel.base_model.model`).
pub const KEY_PREFIX: &str = "base_model.model.";

/// The file key of tensor `suffix` (`lora_A.weight`, ...) of module `path`.
pub fn key(path: &str, suffix: &str) -> String {
    format!("{KEY_PREFIX}{path}.{suffix}")
}

/// Reads every tensor of `DIR/adapter_model.safetensors` (on the CPU, as stored).
pub fn read_weights(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let path = dir.join(WEIGHTS_FILE);
    if !path.exists() && !path.is_symlink() {
        if dir.join("adapter_model.bin").exists() {
            bail!(
                "{}: only adapter_model.bin (a pickle) is there; pickles can run code when loaded, \
                 so re-save the adapter with safe_serialization=True",
                dir.display()
            );
        }
        bail!(
            "{}: not found (a PEFT adapter directory has {WEIGHTS_FILE})",
            path.display()
        );
    }
    let bytes = crate::fsio::read_regular(
        &path,
        crate::fsio::MAX_ADAPTER_BYTES,
        "adapter weights file",
    )?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a valid safetensors file ({e}); it is truncated or corrupt",
            path.display()
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = match crate::dtype::kind_of(view.dtype()) {
            Ok(k @ (Kind::Float | Kind::Half | Kind::BFloat16)) => k,
            _ => bail!(
                "{}: tensor {name} has dtype {:?}; adapters are floating point",
                path.display(),
                view.dtype()
            ),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// A tensor as safetensors writes it: its bytes are read from the tensor
/// only when written, borrowed where it is a contiguous CPU tensor (no copy)
/// and copied one tensor at a time otherwise, so that writing an adapter or
/// an optimizer state never holds a second copy of it whole.
struct TensorView {
    tensor: Tensor,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl TensorView {
    fn new(t: &Tensor) -> Result<Self> {
        Ok(Self {
            dtype: crate::dtype::dtype_of(t.kind())?,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            tensor: t.detach(),
        })
    }
}

impl View for &TensorView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let t = &self.tensor;
        let n = self.data_len();
        if n == 0 {
            return std::borrow::Cow::Borrowed(&[]);
        }
        if t.device() == Device::Cpu && t.is_contiguous() {
            // SAFETY: a contiguous CPU tensor's `n` bytes start at its data
            // pointer and live as long as `self.tensor`, which this borrows.
            let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) };
            return std::borrow::Cow::Borrowed(bytes);
        }
        let t = t.to_device(Device::Cpu).contiguous();
        let mut data = vec![0u8; n];
        t.copy_data_u8(&mut data, t.numel());
        std::borrow::Cow::Owned(data)
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

/// Writes `path` as safetensors with PEFT's metadata, through a temporary
/// file in the same directory that is synced and renamed, so that a crash
/// never leaves half a file. Tensors stream to the file one at a time.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                TensorView::new(t).with_context(|| format!("tensor {k}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut seen = std::collections::BTreeSet::new();
    for (k, _) in &views {
        if !seen.insert(k) {
            bail!("tensor {k} would be written twice to {}", path.display());
        }
    }
    let metadata: HashMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
    crate::fsio::write_atomic_at(path, |tmp| {
        safetensors::serialize_to_file(
            views.iter().map(|(k, v)| (k.as_str(), v)),
            Some(metadata),
            tmp,
        )
        .map_err(Into::into)
    })
}

pub use crate::fsio::write_atomic;

/// The keys and shapes an adapter file must hold for module `path` of a base
/// layer with `in_features` and `out_features`.
pub fn expected_tensors(
    config: &super::LoraConfig,
    path: &str,
    in_features: i64,
    out_features: i64,
) -> Vec<(String, Vec<i64>)> {
    let (r, _) = config.rank_and_alpha(path);
    let r = r as i64;
    let mut v = vec![
        (key(path, "lora_A.weight"), vec![r, in_features]),
        (key(path, "lora_B.weight"), vec![out_features, r]),
    ];
    if config.use_dora {
        v.push((key(path, "lora_magnitude_vector"), vec![out_features]));
    }
    v
}

/// Checks that `found` holds exactly the `expected` keys with the expected
/// shapes; the error names the key and both shapes, or the extra key.
pub fn check_tensors(
    file: &Path,
    expected: &[(String, Vec<i64>)],
    found: &BTreeMap<String, Tensor>,
) -> Result<()> {
    for (k, shape) in expected {
        match found.get(k) {
            None => bail!(
                "{}: tensor {k} is missing (the adapter_config.json targets this module); \
                 the adapter was saved for another base model or is incomplete",
                file.display()
            ),
            Some(t) if &t.size() != shape => bail!(
                "{}: tensor {k} has shape {:?}, but this base model needs {shape:?}; the adapter belongs to another base model",
                file.display(),
                t.size()
            ),
            Some(_) => {}
        }
    }
    let expected_keys: std::collections::BTreeSet<&str> =
        expected.iter().map(|(k, _)| k.as_str()).collect();
    if let Some(extra) = found.keys().find(|k| !expected_keys.contains(k.as_str())) {
        bail!(
            "{}: unexpected tensor {extra} (not a LoRA weight of a module the adapter_config.json targets in this base model)",
            file.display()
        );
    }
    Ok(())
}

/// Takes module `path`'s LoRA weights out of checked file tensors (see
/// [`check_tensors`]) as fp32 on `device`, with the scaling and dropout the
/// configuration gives that module.
pub fn take_weights(
    config: &super::LoraConfig,
    path: &str,
    tensors: &mut BTreeMap<String, Tensor>,
    device: Device,
) -> Result<super::LoraWeights> {
    let mut take = |suffix: &str| -> Result<Tensor> {
        let k = key(path, suffix);
        let t = tensors
            .remove(&k)
            .with_context(|| format!("tensor {k} is missing"))?;
        if !bool::try_from(t.isfinite().all())? {
            bail!("tensor {k} holds NaN or inf; the adapter is broken");
        }
        Ok(t.to_kind(Kind::Float)
            .to_device(device)
            .set_requires_grad(true))
    };
    let (r, alpha) = config.rank_and_alpha(path);
    Ok(super::LoraWeights {
        a: take("lora_A.weight")?,
        b: take("lora_B.weight")?,
        magnitude: if config.use_dora {
            Some(take("lora_magnitude_vector")?)
        } else {
            None
        },
        scaling: config.scaling(r, alpha),
        dropout: config.lora_dropout,
    })
}

/// [`read_checked_with_params`] for tools that apply an adapter to the
/// original base weights as they stream past (GGUF export): an adapter
/// saved unconverted from a PiSSA or OLoRA start, which applies only over a
/// residual base, or one from a LoftQ start (over its quantized base), is
/// refused with the fix.
pub fn read_checked_plain(
    dir: &Path,
    modules: &[(String, i64, i64)],
    params: &[super::param::ParamShape],
    output_head: &str,
    tied_head: bool,
    device: Device,
) -> Result<CheckedAdapter> {
    let read = read_checked_with_params(dir, modules, params, output_head, tied_head, device)?;
    let init = read.0.init_lora_weights;
    refuse_unconverted(dir, init)?;
    if let super::InitLoraWeights::Loftq { .. } = init {
        bail!(
            "{}: `init_lora_weights` = loftq: this adapter applies over LoftQ's NF4-quantized base, not the original one; \
             merge it first (`peft-rs merge` makes that base) and use the merged model",
            dir.join(CONFIG_FILE).display()
        );
    }
    Ok(read)
}

/// Refuses a PiSSA or OLoRA adapter saved unconverted (it applies only
/// over a residual base), with the fix.
pub fn refuse_unconverted(dir: &Path, init: super::InitLoraWeights) -> Result<()> {
    if init.converted_on_save() {
        bail!(
            "{}: `init_lora_weights` = {init}: this adapter applies over a residual base and was saved unconverted; \
             save it again with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA adapter \
             (adapters peft-rs trains are saved that way), or load it with `peft-rs generate`/`eval`, which make the residual",
            dir.join(CONFIG_FILE).display()
        );
    }
    Ok(())
}

/// A PEFT adapter directory read and checked against a base model: the one
/// loading path of `peft-rs` (attaching to a loaded model and streaming
/// merges alike). `modules` are the base's linear modules as (path,
/// in_features, out_features); `output_head` is the module `all-linear`
/// leaves out, and `tied_head` says whether it shares the input embedding
/// (an adapter may then not target it). Returns the configuration and each
/// targeted module's weights (fp32 on `device`), in `modules`' order.
pub fn read_checked(
    dir: &Path,
    modules: &[(String, i64, i64)],
    output_head: &str,
    tied_head: bool,
    device: Device,
) -> Result<(super::LoraConfig, Vec<(String, super::LoraWeights)>)> {
    let config = super::LoraConfig::read(dir)?;
    if !config.target_parameters.is_empty() {
        bail!(
            "{}: `target_parameters` {:?}: an adapter on a mixture of experts' experts or router; \
             `generate`, `eval` and `merge` take it, this command not yet",
            dir.join(CONFIG_FILE).display(),
            config.target_parameters
        );
    }
    let (config, out, _) =
        read_checked_with_params(dir, modules, &[], output_head, tied_head, device)?;
    Ok((config, out))
}

/// What [`read_checked_with_params`] returns: the configuration, the
/// adapted linear modules' weights and the adapted parameters' factors.
pub type CheckedAdapter = (
    super::LoraConfig,
    Vec<(String, super::LoraWeights)>,
    Vec<(String, super::param::ParamLora)>,
);

/// [`read_checked`] for a base that also has parameters an adapter may
/// target directly (`target_parameters`: a mixture of experts' experts and
/// router), given as (path, shape) in the order the model registers them.
pub fn read_checked_with_params(
    dir: &Path,
    modules: &[(String, i64, i64)],
    params: &[super::param::ParamShape],
    output_head: &str,
    tied_head: bool,
    device: Device,
) -> Result<CheckedAdapter> {
    let config_file = dir.join(CONFIG_FILE);
    let config = super::LoraConfig::read(dir)?;
    let paths: Vec<&str> = modules.iter().map(|(p, _, _)| p.as_str()).collect();
    let chosen = config
        .validate()
        .and_then(|()| config.select(&paths, output_head))
        .with_context(|| config_file.display().to_string())?;
    if tied_head && chosen.contains(&output_head) {
        bail!(
            "{}: targets {output_head}, which shares its weight with model.embed_tokens in this base model; leave it out of target_modules",
            config_file.display()
        );
    }
    let chosen_params: Vec<&super::param::ParamShape> = params
        .iter()
        .filter(|p| super::param::targeted(&config.target_parameters, &p.path))
        .collect();
    if !config.target_parameters.is_empty() && chosen_params.is_empty() {
        bail!(
            "{}: `target_parameters` {:?} match no parameter of this base model (peft-rs adapts the experts and router of Qwen3-MoE, Mixtral and gpt-oss models this way)",
            config_file.display(),
            config.target_parameters
        );
    }
    let stems = super::param::key_stems(
        &chosen_params
            .iter()
            .map(|p| p.path.as_str())
            .collect::<Vec<_>>(),
    );
    let mut tensors = read_weights(dir)?;
    let mut expected: Vec<(String, Vec<i64>)> = modules
        .iter()
        .filter(|(p, _, _)| chosen.contains(&p.as_str()))
        .flat_map(|(p, i, o)| expected_tensors(&config, p, *i, *o))
        .collect();
    for (param, stem) in chosen_params.iter().zip(&stems) {
        let (r, _) = config.rank_and_alpha(&param.path);
        let (a, b) = param.factor_shapes(r as i64)?;
        expected.push((key(stem, "lora_A.weight"), a.to_vec()));
        expected.push((key(stem, "lora_B.weight"), b.to_vec()));
    }
    let weights_file = dir.join(WEIGHTS_FILE);
    check_tensors(&weights_file, &expected, &tensors)?;
    let mut out = Vec::with_capacity(chosen.len());
    for (path, _, _) in modules
        .iter()
        .filter(|(p, _, _)| chosen.contains(&p.as_str()))
    {
        let w = take_weights(&config, path, &mut tensors, device)
            .with_context(|| weights_file.display().to_string())?;
        out.push((path.clone(), w));
    }
    let mut param_out = Vec::with_capacity(chosen_params.len());
    for (param, stem) in chosen_params.into_iter().zip(&stems) {
        let path = &param.path;
        let mut take = |suffix: &str| -> Result<Tensor> {
            let k = key(stem, suffix);
            let t = tensors
                .remove(&k)
                .with_context(|| format!("{}: tensor {k} is missing", weights_file.display()))?;
            if !bool::try_from(t.isfinite().all())? {
                bail!(
                    "{}: tensor {k} holds NaN or inf; the adapter is broken",
                    weights_file.display()
                );
            }
            Ok(t.to_kind(Kind::Float)
                .to_device(device)
                .set_requires_grad(true))
        };
        let (r, alpha) = config.rank_and_alpha(path);
        let (experts, _, _) = param.dims()?;
        param_out.push((
            path.clone(),
            super::param::ParamLora {
                a: take("lora_A.weight")?,
                b: take("lora_B.weight")?,
                scaling: config.scaling(r, alpha),
                experts,
                transposed: param.transposed,
                merged: false,
                name: String::new(),
                active: true,
            },
        ));
    }
    Ok((config, out, param_out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Streamed tensors read back as they were: contiguous ones (borrowed),
    /// views that are not contiguous and other dtypes (copied), empty ones.
    #[test]
    fn streamed_tensors_read_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
        let tensors = vec![
            ("a".to_owned(), a.shallow_clone()),
            ("a_t".to_owned(), a.tr()),
            ("half".to_owned(), a.to_kind(Kind::BFloat16)),
            (
                "empty".to_owned(),
                Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
            ),
        ];
        write_safetensors(&path, &tensors).unwrap();
        let back: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(back.len(), tensors.len());
        for (k, t) in &tensors {
            assert_eq!(back[k].size(), t.size(), "{k}");
            assert_eq!(back[k].kind(), t.kind(), "{k}");
            assert!(back[k].equal(t), "{k} differs");
        }
        assert!(
            !crate::fsio::tmp_path(&path).exists(),
            "the temporary file is left"
        );
    }
}
