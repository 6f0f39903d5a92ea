//! IA³ adapters on a loaded base: inject fresh vectors, load PEFT's IA³
//! adapter directories (what PEFT's `IA3Model` does).

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::tied_head_targeted;
use crate::models::{LlamaForCausalLM, OUTPUT_HEAD};
use crate::nn::Linear;
use peft_adapters::ia3::{Ia3Config, Ia3Layer};
use peft_adapters::lora::files::{self, key};

/// The file key suffix of an IA³ vector.
const VECTOR: &str = "ia3_l";

fn attach(lin: &mut Linear, name: &str, l: Tensor, is_feedforward: bool) -> Result<()> {
    if lin.adapter.is_some() {
        bail!("the layer already carries an adapter; peft-rs holds one IA³ adapter per layer, and no other beside it");
    }
    lin.adapter = Some(Box::new(Ia3Layer::new(name, l, is_feedforward)));
    Ok(())
}

/// The paths `config` selects in `model`, refusing a tied output head.
fn select(model: &LlamaForCausalLM, config: &Ia3Config) -> Result<Vec<String>> {
    let modules = model.config.linear_modules();
    let paths: Vec<&str> = modules.iter().map(|(p, _, _)| p.as_str()).collect();
    let chosen: Vec<String> = config
        .select(&paths, OUTPUT_HEAD)?
        .into_iter()
        .map(str::to_owned)
        .collect();
    tied_head_targeted(model, &chosen)?;
    Ok(chosen)
}

/// A vector placed as PEFT places new adapter tensors: through the base's
/// dtype when that is 16-bit (PEFT moves adapters to it, then upcasts them
/// to fp32), then fp32 on `device`, trainable.
fn placed(t: Tensor, base_kind: Kind, device: Device) -> Tensor {
    let t = match base_kind {
        k @ (Kind::BFloat16 | Kind::Half) => t.to_kind(k).to_kind(Kind::Float),
        _ => t,
    };
    t.to_device(device).set_requires_grad(true)
}

/// Injects fresh IA³ vectors `name` into every module `config` selects and
/// returns their paths: ones (the model is unchanged) with
/// `init_ia3_weights`, else N(0, 1) drawn on the CPU as PEFT's `torch.randn`.
pub fn inject(model: &mut LlamaForCausalLM, name: &str, config: &Ia3Config) -> Result<Vec<String>> {
    let chosen = select(model, config)?;
    let device = model.device();
    for (path, lin) in model.linear_layers_mut() {
        if !chosen.contains(&path) {
            continue;
        }
        let (in_f, out_f) = lin.dims();
        let shape = config.vector_shape(&path, in_f, out_f);
        // PEFT draws the normal values even when it then sets them to one.
        let l = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
        let l = if config.init_ia3_weights {
            l.ones_like()
        } else {
            l
        };
        let base_kind = if lin.weight.is_quantized() {
            Kind::Float // PEFT casts adapters only to a float base dtype
        } else {
            lin.weight.compute_kind()
        };
        let l = placed(l, base_kind, device);
        attach(lin, name, l, config.is_feedforward(&path)).with_context(|| path.clone())?;
    }
    Ok(chosen)
}

/// Loads the IA³ adapter directory `dir` (its configuration already read
/// as `config`) as adapter `name`, checking every vector against the base.
pub fn load(
    model: &mut LlamaForCausalLM,
    dir: &Path,
    name: &str,
    config: &Ia3Config,
) -> Result<()> {
    let chosen = select(model, config)
        .with_context(|| dir.join(files::CONFIG_FILE).display().to_string())?;
    let mut tensors = files::read_weights(dir)?;
    let expected: Vec<(String, Vec<i64>)> = model
        .config
        .linear_modules()
        .iter()
        .filter(|(p, _, _)| chosen.contains(p))
        .map(|(p, i, o)| (key(p, VECTOR), config.vector_shape(p, *i, *o)))
        .collect();
    let file = dir.join(files::WEIGHTS_FILE);
    files::check_tensors(&file, &expected, &tensors)?;
    let device = model.device();
    for (path, lin) in model.linear_layers_mut() {
        let Some(t) = tensors.remove(&key(&path, VECTOR)) else {
            continue;
        };
        if !bool::try_from(t.isfinite().all())? {
            bail!(
                "{}: tensor {} holds NaN or inf; the adapter is broken",
                file.display(),
                key(&path, VECTOR)
            );
        }
        let l = t
            .to_kind(Kind::Float)
            .to_device(device)
            .set_requires_grad(true);
        attach(lin, name, l, config.is_feedforward(&path)).with_context(|| path.clone())?;
    }
    Ok(())
}
