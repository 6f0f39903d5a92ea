//! peft-rs as a library: load a base model, inject LoRA adapters by Hugging
//! Face module path, run a forward pass, save the adapter in PEFT's format,
//! load it onto a fresh base, merge it into the weights and unmerge again.
//!
//! cargo run --example lora_library -- [MODEL_DIR] [OUT_DIR]

use std::path::PathBuf;

use anyhow::Result;
use peft_rs::adapters::lora::{LoraConfig, TargetModules};
use peft_rs::models::Pretrained;
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(peft_rs::device::default_model_dir);
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("peft-rs-example-adapter"));

    let mut base = Pretrained::load(&model_dir, Kind::Float, Device::Cpu)?;
    let ids: Vec<i64> = base
        .tokenizer
        .encode("The capital of France is", true)?
        .into_iter()
        .map(i64::from)
        .collect();
    let input = Tensor::from_slice(&ids).unsqueeze(0);
    let before = tch::no_grad(|| base.model.forward(&input));

    // PEFT's LoraConfig, field for field.
    let config = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        target_modules: TargetModules::AllLinear,
        base_model_name_or_path: Some(model_dir.display().to_string()),
        ..LoraConfig::default()
    };
    tch::manual_seed(0);
    let modules = peft_model::inject(&mut base.model, DEFAULT_ADAPTER, &config)?;
    println!(
        "injected into {} modules; {}",
        modules.len(),
        peft_model::trainable_parameters_line(&base.model)
    );

    // B starts at zero, so a fresh adapter leaves the logits exactly as they were.
    let fresh = tch::no_grad(|| base.model.forward(&input));
    println!(
        "max |logits change| with fresh adapters: {}",
        (&fresh - &before).abs().max().double_value(&[])
    );

    // Stand-in for training: give B some values so the adapter does something.
    tch::no_grad(|| {
        for (_, t) in peft_model::trainable_parameters(&base.model) {
            if t.size()[1] == config.r as i64 {
                let _ = t.shallow_clone().normal_(0.0, 0.02);
            }
        }
    });
    let adapted = tch::no_grad(|| base.model.forward(&input));
    peft_model::save_adapter(&base.model, DEFAULT_ADAPTER, &config, &out)?;
    println!(
        "adapter saved to {} (loadable with PeftModel.from_pretrained)",
        out.display()
    );

    // A fresh base with the saved adapter gives the same logits; merging folds it in.
    let mut other = Pretrained::load(&model_dir, Kind::Float, Device::Cpu)?;
    peft_model::load_adapter(&mut other.model, &out, DEFAULT_ADAPTER)?;
    let loaded = tch::no_grad(|| other.model.forward(&input));
    peft_model::merge(&mut other.model)?;
    let merged = tch::no_grad(|| other.model.forward(&input));
    peft_model::unmerge(&mut other.model)?;
    let unmerged = tch::no_grad(|| other.model.forward(&input));
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    println!("max |loaded - adapted|   = {:.2e}", diff(&loaded, &adapted));
    println!("max |merged - adapted|   = {:.2e}", diff(&merged, &adapted));
    println!(
        "max |unmerged - adapted| = {:.2e}",
        diff(&unmerged, &adapted)
    );
    Ok(())
}
