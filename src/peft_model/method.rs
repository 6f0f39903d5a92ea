//! Adapters of methods other than LoRA (IA³, LoHa, LoKr, VeRA) on a loaded
//! base: inject fresh ones and load PEFT's adapter directories, through
//! each method's [`Method`] parts.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::selected_paths;
use crate::models::{LlamaForCausalLM, OUTPUT_HEAD};
use crate::nn::Linear;
use peft_adapters::lora::files;
use peft_adapters::lora::layer::placed_like_peft;
use peft_adapters::method::{read_tensors, Method};

fn attach(lin: &mut Linear, layer: Box<dyn peft_adapters::LinearAdapter>) -> Result<()> {
    if lin.adapter.is_some() {
        bail!("the layer already carries an adapter; peft-rs holds one adapter per layer for methods other than LoRA");
    }
    lin.adapter = Some(layer);
    Ok(())
}

/// The paths `method` selects in `model`, refusing a tied output head.
fn select(model: &LlamaForCausalLM, method: &dyn Method) -> Result<Vec<String>> {
    selected_paths(model, method.target_modules(), |paths| {
        method.select(paths, OUTPUT_HEAD)
    })
}

/// The selected modules with their `(in, out)`, in the model's order.
fn adapted(model: &LlamaForCausalLM, chosen: &[String]) -> Vec<(String, i64, i64)> {
    model
        .config
        .linear_modules()
        .into_iter()
        .filter(|(p, _, _)| chosen.contains(p))
        .collect()
}

/// A fresh tensor placed as PEFT places new adapter tensors (see
/// [`placed_like_peft`]); PEFT leaves them alone on a quantized base.
fn placed(t: Tensor, lin: &Linear, device: Device) -> Tensor {
    let base_kind = if lin.weight.is_quantized() {
        Kind::Float
    } else {
        lin.weight.compute_kind()
    };
    placed_like_peft(t, base_kind, device)
}

/// Attaches adapter `name` to every module of `tensors` (path -> its
/// tensors), with the `shared` ones.
fn attach_all(
    model: &mut LlamaForCausalLM,
    name: &str,
    method: &dyn Method,
    mut tensors: std::collections::BTreeMap<String, Vec<Tensor>>,
    shared: &[Tensor],
) -> Result<()> {
    for (path, lin) in model.linear_layers_mut() {
        if let Some(ts) = tensors.remove(&path) {
            let layer = method.layer(&path, lin.dims(), name, ts, shared);
            attach(lin, layer).with_context(|| path.clone())?;
        }
    }
    Ok(())
}

/// Injects a fresh adapter `name` of `method` into every module it selects
/// and returns their paths; the draws are PEFT's for the same seed.
pub fn inject(
    model: &mut LlamaForCausalLM,
    name: &str,
    method: &dyn Method,
) -> Result<Vec<String>> {
    let chosen = select(model, method)?;
    let device = model.device();
    let mut fresh = std::collections::BTreeMap::new();
    for (path, lin) in model.linear_layers() {
        if chosen.contains(&path) {
            let (in_f, out_f) = lin.dims();
            let ts = method.fresh(&path, in_f, out_f);
            fresh.insert(
                path,
                ts.into_iter().map(|t| placed(t, lin, device)).collect(),
            );
        }
    }
    let dims: Vec<(i64, i64)> = adapted(model, &chosen)
        .iter()
        .map(|(_, i, o)| (*i, *o))
        .collect();
    let shared: Vec<Tensor> = method
        .fresh_shared(&dims)
        .into_iter()
        .map(|t| t.to_device(device))
        .collect();
    attach_all(model, name, method, fresh, &shared)?;
    Ok(chosen)
}

/// Loads the adapter directory `dir` (its configuration already read as
/// `method`) as adapter `name`, checking every tensor against the base.
pub fn load(
    model: &mut LlamaForCausalLM,
    dir: &Path,
    name: &str,
    method: &dyn Method,
) -> Result<()> {
    let chosen = select(model, method)
        .with_context(|| dir.join(files::CONFIG_FILE).display().to_string())?;
    let read = read_tensors(dir, method, &adapted(model, &chosen))?;
    let device = model.device();
    let on_device = |t: Tensor| t.to_device(device);
    let modules = read
        .modules
        .into_iter()
        .map(|(p, ts)| {
            let ts = ts
                .into_iter()
                .map(|t| on_device(t).set_requires_grad(true))
                .collect();
            (p, ts)
        })
        .collect();
    let shared: Vec<Tensor> = read.shared.into_iter().map(on_device).collect();
    attach_all(model, name, method, modules, &shared)
}
