//! Adapters of methods other than LoRA (IA³, LoHa, LoKr) on a loaded base: inject
//! fresh ones and load PEFT's adapter directories, through each method's
//! [`Method`] parts.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::selected_paths;
use crate::models::{LlamaForCausalLM, OUTPUT_HEAD};
use crate::nn::Linear;
use peft_adapters::lora::files::{self, key};
use peft_adapters::lora::layer::placed_like_peft;
use peft_adapters::method::Method;

fn attach(lin: &mut Linear, layer: Box<dyn peft_adapters::LinearAdapter>) -> Result<()> {
    if lin.adapter.is_some() {
        bail!("the layer already carries an adapter; peft-rs holds one adapter per layer for methods other than LoRA");
    }
    lin.adapter = Some(layer);
    Ok(())
}

/// The paths `method` selects in `model`, refusing a tied output head.
fn select(model: &LlamaForCausalLM, method: &dyn Method) -> Result<Vec<String>> {
    selected_paths(model, |paths| method.select(paths, OUTPUT_HEAD))
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

/// Injects a fresh adapter `name` of `method` into every module it selects
/// and returns their paths; the draws are PEFT's for the same seed.
pub fn inject(
    model: &mut LlamaForCausalLM,
    name: &str,
    method: &dyn Method,
) -> Result<Vec<String>> {
    let chosen = select(model, method)?;
    let device = model.device();
    for (path, lin) in model.linear_layers_mut() {
        if !chosen.contains(&path) {
            continue;
        }
        let (in_f, out_f) = lin.dims();
        let tensors = method
            .fresh(&path, in_f, out_f)
            .into_iter()
            .map(|t| placed(t, lin, device))
            .collect();
        attach(lin, method.layer(&path, in_f, out_f, name, tensors))
            .with_context(|| path.clone())?;
    }
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
    let mut tensors = files::read_weights(dir)?;
    let shapes = |p: &str, i: i64, o: i64| -> Vec<(String, Vec<i64>)> {
        method
            .tensor_shapes(p, i, o)
            .into_iter()
            .map(|(s, shape)| (key(p, &s), shape))
            .collect()
    };
    let expected: Vec<(String, Vec<i64>)> = model
        .config
        .linear_modules()
        .iter()
        .filter(|(p, _, _)| chosen.contains(p))
        .flat_map(|(p, i, o)| shapes(p, *i, *o))
        .collect();
    let file = dir.join(files::WEIGHTS_FILE);
    files::check_tensors(&file, &expected, &tensors)?;
    let device = model.device();
    for (path, lin) in model.linear_layers_mut() {
        if !chosen.contains(&path) {
            continue;
        }
        let (in_f, out_f) = lin.dims();
        let mut taken = Vec::new();
        for (k, _) in shapes(&path, in_f, out_f) {
            let t = tensors.remove(&k).expect("checked");
            if !bool::try_from(t.isfinite().all())? {
                bail!(
                    "{}: tensor {k} holds NaN or inf; the adapter is broken",
                    file.display()
                );
            }
            taken.push(
                t.to_kind(Kind::Float)
                    .to_device(device)
                    .set_requires_grad(true),
            );
        }
        attach(lin, method.layer(&path, in_f, out_f, name, taken)).with_context(|| path.clone())?;
    }
    Ok(())
}
