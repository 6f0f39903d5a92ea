//! Attaching adapters to a loaded base model by Hugging Face module path:
//! inject fresh ones, load and save PEFT adapter directories, choose or
//! combine adapters, merge and unmerge — what PEFT's `PeftModel` and
//! `LoraModel` do. Methods other than LoRA go through [`method`].

pub mod method;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use crate::models::LlamaForCausalLM;
use crate::models::OUTPUT_HEAD;
use crate::nn::Linear;
use peft_adapters::lora::files::{self, key};
use peft_adapters::lora::init::{from_base, loftq};
use peft_adapters::lora::param::ParamLora;
use peft_adapters::lora::{
    Combination, InitLoraWeights, LoraConfig, LoraLayer, LoraWeights, TargetModules,
};
use peft_adapters::method::AdapterConfig;

/// The name PEFT gives an adapter when none is given.
pub const DEFAULT_ADAPTER: &str = "default";

fn attach(lin: &mut Linear, name: &str, weights: LoraWeights) -> Result<()> {
    match lin.adapter.as_mut() {
        None => {
            lin.adapter = Some(Box::new(LoraLayer::new(name, weights)));
            Ok(())
        }
        Some(a) => a.add_lora(name, weights),
    }
}

/// The module paths `config` selects in `model`, refusing a tied output head.
fn select(model: &LlamaForCausalLM, config: &LoraConfig) -> Result<Vec<String>> {
    config.validate()?;
    selected_paths(model, &config.target_modules, |paths| {
        config.select(paths, OUTPUT_HEAD)
    })
}

/// The linear-module paths of `model` that `choose` picks from all of them
/// (as `targets` says), refusing an output head tied to the embeddings and
/// `all-linear` on a mixture of experts.
fn selected_paths(
    model: &LlamaForCausalLM,
    targets: &TargetModules,
    choose: impl for<'a> FnOnce(&[&'a str]) -> Result<Vec<&'a str>>,
) -> Result<Vec<String>> {
    if *targets == TargetModules::AllLinear && all_linear_takes_experts(&model.config) {
        // PEFT resolves `all-linear` on these models to the attention
        // projections plus the router and the experts as `target_parameters`
        // (peft.utils.transformers_weight_conversion); the same name must
        // not silently adapt less here.
        bail!(
            "target_modules `all-linear` on a mixture-of-experts model ({}): PEFT then also adapts the router and the \
             experts (`target_parameters`), which peft-rs does not do yet; name the modules instead, e.g. \
             --target-modules q_proj,k_proj,v_proj,o_proj",
            model.config.model_type
        );
    }
    let modules = model.config.linear_modules();
    let paths: Vec<&str> = modules.iter().map(|(p, _, _)| p.as_str()).collect();
    let chosen: Vec<String> = choose(&paths)?.into_iter().map(str::to_owned).collect();
    if model.config.tie_word_embeddings && chosen.iter().any(|p| p == OUTPUT_HEAD) {
        bail!("lm_head shares its weight with model.embed_tokens in this model; leave it out of target_modules");
    }
    Ok(chosen)
}

/// Injects a freshly initialised adapter `name` into every module `config`
/// selects and returns their paths. Initial weights follow PEFT
/// (`init_lora_weights`), so the model's output is unchanged by default.
pub fn inject(
    model: &mut LlamaForCausalLM,
    name: &str,
    config: &LoraConfig,
) -> Result<Vec<String>> {
    let config = &for_model(config, &model.config);
    let chosen = select(model, config)?;
    let device = model.device();
    for (path, lin) in model.linear_layers_mut() {
        if !chosen.contains(&path) {
            continue;
        }
        let (r, alpha) = config.rank_and_alpha(&path);
        let scaling = config.scaling(r, alpha);
        if config.init_lora_weights.mutates_base() {
            let init = config.init_lora_weights;
            let (trained, initial) =
                init_from_base(lin, r, scaling, config.lora_dropout, init, device)
                    .with_context(|| path.clone())?;
            attach(lin, name, trained).with_context(|| path.clone())?;
            keep_initial(lin, name, init, initial).with_context(|| path.clone())?;
            continue;
        }
        let base = match &lin.weight {
            // A sharded base (`--fsdp`) is not whole here: LoRA reads only
            // its shape and dtype, DoRA its values.
            crate::quant::FrozenWeight::Sharded(s) if !config.use_dora => s.stand_in(device),
            _ => lin.weight.dense(),
        };
        let w = LoraWeights::init(
            &base,
            r,
            scaling,
            config.lora_dropout,
            config.init_lora_weights,
            config.use_dora,
            device,
        );
        attach(lin, name, w).with_context(|| path.clone())?;
    }
    let mut chosen = chosen;
    chosen.extend(inject_parameters(model, name, config)?);
    Ok(chosen)
}

/// `config` as PEFT applies it to `model`: `all-linear` on a mixture of
/// experts resolved as PEFT 0.21 resolves it with transformers 5
/// (`peft.utils.transformers_weight_conversion`): the linear modules by
/// name, less the transformers-4 names of the router and the experts
/// (`gate`, `gate_proj`, `up_proj`, `down_proj`; Mixtral's `w1`, `w3`,
/// `w2`), which become `target_parameters` — the router's `gate.weight`,
/// the experts' `gate_up_proj` (gate and up fused: twice the rank and
/// alpha, through `rank_pattern`/`alpha_pattern`) and `down_proj`. (So, as
/// in PEFT, the dense MLPs of `mlp_only_layers` are not adapted.) Any other
/// configuration is returned as it is.
pub fn for_model(config: &LoraConfig, model: &crate::models::LlamaConfig) -> LoraConfig {
    // PEFT adds the router and the experts only where transformers
    // converts the checkpoint (Qwen3-MoE, Mixtral); gpt-oss's all-linear is
    // its attention.
    let Some(moe) = model
        .moe
        .as_ref()
        .filter(|_| all_linear_takes_experts(model))
    else {
        return config.clone();
    };
    if config.target_modules != TargetModules::AllLinear {
        return config.clone();
    }
    let (_, gate, up, down) = moe.per_expert_names;
    let v4 = ["gate", gate, up, down];
    let names: std::collections::BTreeSet<String> = model
        .linear_modules()
        .into_iter()
        .filter(|(p, _, _)| p != OUTPUT_HEAD)
        .filter_map(|(p, _, _)| p.rsplit('.').next().map(str::to_owned))
        .filter(|n| !v4.contains(&n.as_str()))
        .collect();
    let fused = r".*\.gate_up_proj".to_owned();
    let mut c = config.clone();
    c.target_modules = TargetModules::Names(names.into_iter().collect());
    c.target_parameters = ["gate.weight", "gate_up_proj", "down_proj"]
        .map(String::from)
        .to_vec();
    c.rank_pattern.insert(fused.clone(), 2 * config.r);
    c.alpha_pattern.insert(fused, 2.0 * config.lora_alpha);
    c
}

/// Whether PEFT's `all-linear` on this model also means its router and
/// experts: where transformers converts the checkpoint's experts
/// (Qwen3-MoE, Mixtral; `peft.utils.transformers_weight_conversion`), not
/// gpt-oss, whose checkpoints need no conversion.
fn all_linear_takes_experts(model: &crate::models::LlamaConfig) -> bool {
    model
        .moe
        .as_ref()
        .is_some_and(|m| m.style == crate::models::config::ExpertStyle::SwiGlu)
}

/// Fresh LoRA factors on the parameters `config.target_parameters` names
/// (after the linear modules, as PEFT injects them); their paths.
fn inject_parameters(
    model: &mut LlamaForCausalLM,
    name: &str,
    config: &LoraConfig,
) -> Result<Vec<String>> {
    if config.target_parameters.is_empty() {
        return Ok(Vec::new());
    }
    if config.init_lora_weights != InitLoraWeights::Default {
        bail!(
            "`init_lora_weights` = {}: LoRA on `target_parameters` (experts, routers) starts as PEFT's default only (true)",
            config.init_lora_weights
        );
    }
    let device = model.device();
    let shapes = model.config.adaptable_parameters();
    let mut chosen = Vec::new();
    for (path, w, slot) in model.parameter_adapters_mut() {
        if !peft_adapters::lora::param::targeted(&config.target_parameters, &path) {
            continue;
        }
        let shape = shapes
            .iter()
            .find(|p| p.path == path)
            .with_context(|| format!("internal: {path} is not an adaptable parameter"))?;
        if slot.is_some() {
            bail!("{path} already carries an adapter; peft-rs holds one adapter per parameter (`target_parameters`)");
        }
        let (r, alpha) = config.rank_and_alpha(&path);
        let scaling = config.scaling(r, alpha);
        *slot = Some(ParamLora::init(
            shape,
            w.kind(),
            r as i64,
            scaling,
            name,
            device,
        )?);
        chosen.push(path);
    }
    if chosen.is_empty() {
        bail!(
            "`target_parameters` {:?} match no parameter of this model (peft-rs adapts the experts and router of Qwen3-MoE, Mixtral and gpt-oss models this way)",
            config.target_parameters
        );
    }
    Ok(chosen)
}

/// Injects a fresh adapter `name` of `config`'s method ([`inject`],
/// [`method::inject`]) and returns the adapted paths.
pub fn inject_adapter(
    model: &mut LlamaForCausalLM,
    name: &str,
    config: &AdapterConfig,
) -> Result<Vec<String>> {
    match config {
        AdapterConfig::Lora(c) => inject(model, name, c),
        other => method::inject(model, name, other.as_method().expect("not LoRA")),
    }
}

/// The configuration an adapter of `config` is saved with (a PiSSA/OLoRA
/// adapter's after its conversion, see [`saved_form`]).
pub fn saved_config(config: &AdapterConfig) -> AdapterConfig {
    match config {
        AdapterConfig::Lora(c) => c.converted_for_saving().into(),
        other => other.clone(),
    }
}

/// The name of the inactive copy of a PiSSA/OLoRA adapter's initial
/// weights, which saving needs to express the trained adapter against the
/// original base.
fn initial_name(name: &str) -> String {
    format!("{name}:initial")
}

/// Keeps the untrained copy `initial` of adapter `name` beside it, inactive,
/// where saving converts the adapter (PiSSA, OLoRA).
fn keep_initial(
    lin: &mut Linear,
    name: &str,
    init: InitLoraWeights,
    initial: LoraWeights,
) -> Result<()> {
    if init.converted_on_save() {
        attach(lin, &initial_name(name), initial)?;
    }
    Ok(())
}

/// PiSSA's, OLoRA's or LoftQ's initial adapter for `lin`, whose weight
/// becomes the residual (LoftQ: the quantization): the adapter to train
/// and an untrained copy of it (both fp32 on `device`, placed as
/// [`LoraWeights::init`] places its draws). A quantized weight is
/// dequantized and its residual quantized again, as PEFT does for OLoRA;
/// PiSSA and LoftQ refuse it.
fn init_from_base(
    lin: &mut Linear,
    r: usize,
    scaling: f64,
    dropout: f64,
    init: InitLoraWeights,
    device: tch::Device,
) -> Result<(LoraWeights, LoraWeights)> {
    if matches!(lin.weight, crate::quant::FrozenWeight::Sharded(_)) {
        bail!("`init_lora_weights` = {init} reads the whole base weight, which a base sharded over ranks (--fsdp) does not hold");
    }
    if lin.weight.is_quantized() && matches!(init, InitLoraWeights::Pissa { .. }) {
        bail!("`init_lora_weights` = {init} needs a 16- or 32-bit base weight, as in PEFT: train without 4/8-bit quantization (and quantize the merged model afterwards), or use olora");
    }
    if lin.weight.is_quantized() && matches!(init, InitLoraWeights::Loftq { .. }) {
        bail!("`init_lora_weights` = loftq quantizes the base itself (NF4, as PEFT's loftq_init): load the base in 16 or 32 bits, without --quantize/--load-in-4bit");
    }
    let dense = lin.weight.dense();
    // PEFT moves new adapters to the base's dtype only when that is a float dtype.
    let kind = if lin.weight.is_quantized() {
        Kind::Float
    } else {
        dense.kind()
    };
    let f = match init {
        InitLoraWeights::Loftq { iters } => loftq(&dense, r as i64, iters, nf4_roundtrip)?,
        _ => from_base(&dense, r as i64, scaling, init)?,
    };
    drop(dense);
    lin.weight.replace(&f.residual)?;
    let place = |a: &Tensor, b: &Tensor, dropout| {
        LoraWeights::from_initial(a.copy(), b.copy(), kind, scaling, dropout, device)
    };
    let initial = place(&f.a, &f.b, 0.0);
    let _ = initial.a.set_requires_grad(false);
    let _ = initial.b.set_requires_grad(false);
    Ok((place(&f.a, &f.b, dropout), initial))
}

/// W quantized to NF4 and dequantized, in fp32, as LoftQ quantizes it:
/// bitsandbytes' `Params4bit(quant_type="nf4", compress_statistics=False)`
/// (blocks of 64, fp32 absmax).
pub(crate) fn nf4_roundtrip(w: &Tensor) -> Result<Tensor> {
    let q = crate::quant::four_bit::quantize_4bit(w, crate::quant::QuantType::Nf4, false)?;
    Ok(q.dequantize(Kind::Float, w.device()))
}

/// Loads a PEFT adapter directory (LoRA or IA³, as its `peft_type` says) as
/// adapter `name`, checking every tensor against the base: a missing key, an
/// extra key or a wrong shape is an error naming the key (and both shapes).
pub fn load_adapter(model: &mut LlamaForCausalLM, dir: &Path, name: &str) -> Result<AdapterConfig> {
    match AdapterConfig::read(dir)? {
        AdapterConfig::Lora(_) => load_lora(model, dir, name).map(AdapterConfig::Lora),
        other => {
            method::load(model, dir, name, other.as_method().expect("not LoRA"))?;
            Ok(other)
        }
    }
}

/// [`load_adapter`] for a LoRA adapter directory.
fn load_lora(model: &mut LlamaForCausalLM, dir: &Path, name: &str) -> Result<LoraConfig> {
    let (config, mut weights, params) = files::read_checked_with_params(
        dir,
        &model.config.linear_modules(),
        &model.config.adaptable_parameters(),
        OUTPUT_HEAD,
        model.config.tie_word_embeddings,
        model.device(),
    )?;
    attach_parameters(model, dir, name, params)?;
    let init = config.init_lora_weights;
    if let InitLoraWeights::Pissa { niter: Some(_) } = init {
        bail!(
            "{}: `init_lora_weights` = {init}: this adapter was saved unconverted, and its starting point came from a random projection that cannot be drawn again; \
             save it with PEFT's path_initial_model_for_weight_conversion (peft-rs saves such adapters converted)",
            dir.join(files::CONFIG_FILE).display()
        );
    }
    let device = model.device();
    for (path, lin) in model.linear_layers_mut() {
        if let Some(i) = weights.iter().position(|(p, _)| *p == path) {
            let (_, w) = weights.swap_remove(i);
            if init.mutates_base() {
                // As PEFT loading it: the base becomes the residual of a
                // fresh initialisation, over which the saved A and B apply.
                let (r, scaling, dropout) = (w.rank() as usize, w.scaling, w.dropout);
                let (_, initial) = init_from_base(lin, r, scaling, dropout, init, device)
                    .with_context(|| path.clone())?;
                attach(lin, name, w).with_context(|| path.clone())?;
                keep_initial(lin, name, init, initial).with_context(|| path.clone())?;
                continue;
            }
            attach(lin, name, w).with_context(|| path.clone())?;
        }
    }
    Ok(config)
}

/// Attaches LoRA factors to the parameters they adapt (`target_parameters`).
fn attach_parameters(
    model: &mut LlamaForCausalLM,
    dir: &Path,
    name: &str,
    mut params: Vec<(String, ParamLora)>,
) -> Result<()> {
    for (path, _, slot) in model.parameter_adapters_mut() {
        if let Some(i) = params.iter().position(|(p, _)| *p == path) {
            let (_, lora) = params.swap_remove(i);
            if slot.is_some() {
                bail!(
                    "{}: {path} already carries an adapter; peft-rs holds one adapter per parameter (`target_parameters`)",
                    dir.display()
                );
            }
            *slot = Some(ParamLora {
                name: name.to_owned(),
                ..lora
            });
        }
    }
    Ok(())
}

/// The LoRA factors of adapter `name` on parameters (`target_parameters`),
/// under their PEFT file keys (nested wrappers: see
/// [`peft_adapters::lora::param::key_stems`]).
fn parameter_tensors(model: &LlamaForCausalLM, name: &str) -> Vec<(String, Tensor)> {
    let adapted: Vec<(String, &ParamLora)> = model
        .parameter_adapters()
        .into_iter()
        .filter_map(|(p, _, l)| l.as_ref().filter(|l| l.name == name).map(|l| (p, l)))
        .collect();
    let paths: Vec<&str> = adapted.iter().map(|(p, _)| p.as_str()).collect();
    let stems = peft_adapters::lora::param::key_stems(&paths);
    adapted
        .iter()
        .zip(stems)
        .flat_map(|((_, l), stem)| {
            [
                (key(&stem, "lora_A.weight"), l.a.shallow_clone()),
                (key(&stem, "lora_B.weight"), l.b.shallow_clone()),
            ]
        })
        .collect()
}

/// Folds each parameter adapter into its parameter (`merge`), or takes it
/// back out (`!merge`), in the parameter's dtype as PEFT does.
fn change_parameters(model: &mut LlamaForCausalLM, merge: bool) {
    tch::no_grad(|| {
        for (_, w, slot) in model.parameter_adapters_mut() {
            if let Some(l) = slot.as_mut().filter(|l| l.merged != merge) {
                let delta = l.delta().to_kind(w.kind()).to_device(w.device());
                if merge {
                    *w += delta;
                } else {
                    *w -= delta;
                }
                l.merged = merge;
            }
        }
    });
}

/// The tensors of adapter `name` under their PEFT file keys, those all
/// layers share (VeRA's projections) once, under `base_model.`.
pub fn adapter_tensors(model: &LlamaForCausalLM, name: &str) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    let mut shared = BTreeMap::new();
    for (path, lin) in model.linear_layers() {
        if let Some(a) = lin.adapter.as_ref() {
            out.extend(
                a.state_dict(name)
                    .into_iter()
                    .map(|(s, t)| (key(&path, &s), t)),
            );
            for (s, t) in a.shared_state(name) {
                shared.entry(format!("base_model.{s}")).or_insert(t);
            }
        }
    }
    out.extend(shared);
    out.extend(parameter_tensors(model, name));
    out
}

/// Adapter `name` as it is saved: its configuration and its tensors under
/// their file keys. A PiSSA or OLoRA adapter, trained over a residual base,
/// is converted into a plain LoRA adapter against the original base, as
/// PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`
/// does: BA − B₀A₀ = [B | −B₀][A ; A₀], twice the rank at the same
/// scaling, so it loads anywhere (llama.cpp, vLLM, PEFT) without the
/// residual.
pub fn saved_form(
    model: &LlamaForCausalLM,
    name: &str,
    config: &AdapterConfig,
) -> Result<(AdapterConfig, Vec<(String, Tensor)>)> {
    let tensors = adapter_tensors(model, name);
    if tensors.is_empty() {
        bail!("no adapter named `{name}` is attached to the model");
    }
    let config = match config {
        AdapterConfig::Lora(c) if c.init_lora_weights.converted_on_save() => c,
        other => return Ok((other.clone(), tensors)),
    };
    let initial: BTreeMap<String, Tensor> = adapter_tensors(model, &initial_name(name))
        .into_iter()
        .collect();
    let converted = tensors
        .into_iter()
        .map(|(k, t)| {
            let Some(t0) = initial.get(&k) else {
                bail!("{k}: the adapter's initial weights are not kept, so it cannot be saved against the original base");
            };
            let t = tch::no_grad(|| {
                if k.ends_with("lora_A.weight") {
                    Tensor::cat(&[&t, t0], 0)
                } else {
                    Tensor::cat(&[&t, &(-t0)], 1)
                }
            });
            Ok((k, t))
        })
        .collect::<Result<_>>()?;
    Ok((config.converted_for_saving().into(), converted))
}

/// Saves adapter `name` as a PEFT adapter directory (each file written to a
/// temporary name and renamed).
pub fn save_adapter(
    model: &LlamaForCausalLM,
    name: &str,
    config: &LoraConfig,
    dir: &Path,
) -> Result<()> {
    save_adapter_of(model, name, &config.clone().into(), dir)
}

/// [`save_adapter`] for an adapter of any method.
pub fn save_adapter_of(
    model: &LlamaForCausalLM,
    name: &str,
    config: &AdapterConfig,
    dir: &Path,
) -> Result<()> {
    let (mut config, tensors) = saved_form(model, name, config)?;
    if let AdapterConfig::Lora(c) = &mut config {
        // What PEFT makes of `all-linear` on this model, spelled out.
        *c = for_model(c, &model.config);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    files::write_safetensors(&dir.join(files::WEIGHTS_FILE), &tensors)?;
    if !model.config.skipped_towers.is_empty() {
        // In a multimodal model, PEFT would match `all-linear` or a module
        // name in the towers peft-rs skips too: name the adapted modules.
        let adapted = TargetModules::Names(
            model
                .linear_layers()
                .into_iter()
                .filter(|(_, lin)| {
                    lin.adapter
                        .as_ref()
                        .is_some_and(|a| !a.state_dict(name).is_empty())
                })
                .map(|(path, _)| path)
                .collect(),
        );
        config.set_target_modules(adapted);
    }
    let json = serde_json::to_string_pretty(&config.to_json())?;
    files::write_atomic(&dir.join(files::CONFIG_FILE), json.as_bytes())
}

/// Calls `f` on the adapter of every linear layer that has one.
fn for_each_adapter(
    model: &mut LlamaForCausalLM,
    mut f: impl FnMut(&mut Box<dyn peft_adapters::LinearAdapter>),
) {
    for (_, lin) in model.linear_layers_mut() {
        if let Some(a) = lin.adapter.as_mut() {
            f(a);
        }
    }
}

/// Makes `names` the adapters summed in every forward pass.
pub fn set_active(model: &mut LlamaForCausalLM, names: &[String]) {
    for_each_adapter(model, |a| a.set_active(names));
    for (_, _, slot) in model.parameter_adapters_mut() {
        if let Some(l) = slot.as_mut() {
            l.active = names.contains(&l.name);
        }
    }
}

/// Switches dropout in every adapter on (training) or off.
pub fn set_training(model: &mut LlamaForCausalLM, training: bool) {
    for_each_adapter(model, |a| a.set_training(training));
}

/// Lets adapters on layers that read the same input share one dropout
/// draw (`--share-lora-dropout`), or not.
pub fn set_dropout_sharing(model: &mut LlamaForCausalLM, shared: bool) {
    for_each_adapter(model, |a| a.set_dropout_sharing(shared));
}

/// Sets the dtype of every adapter's matmuls (`--lora-compute-dtype`).
pub fn set_compute_kind(model: &mut LlamaForCausalLM, kind: Kind) {
    for_each_adapter(model, |a| a.set_compute_kind(kind));
}

/// Builds adapter `new_name` as a weighted combination of loaded adapters, as
/// PEFT's `add_weighted_adapter` does. The new adapter is not activated.
pub fn add_weighted_adapter(
    model: &mut LlamaForCausalLM,
    names: &[String],
    weights: &[f64],
    new_name: &str,
    combination: Combination,
) -> Result<()> {
    if names.len() != weights.len() || names.is_empty() {
        bail!(
            "give one weight per adapter ({} adapters, {} weights)",
            names.len(),
            weights.len()
        );
    }
    for (path, lin) in model.linear_layers_mut() {
        if let Some(a) = lin.adapter.as_mut() {
            a.add_weighted(names, weights, new_name, combination)
                .with_context(|| path.clone())?;
        }
    }
    Ok(())
}

/// Folds the active adapters into the base weights in memory (PEFT's
/// `merge_adapter`); a quantized weight is dequantized, merged and quantized
/// again, as PEFT does on a bitsandbytes layer (so it loses precision).
pub fn merge(model: &mut LlamaForCausalLM) -> Result<()> {
    change_parameters(model, true);
    change_base_weights(model, |a, w, b| {
        // The bias first: it takes what `merge` is about to fold (IA³).
        if let Some(b) = b {
            a.merge_bias(b)?;
        }
        a.merge(w)
    })
}

/// Applies `change` (a merge or an unmerge) to the dense weight of every
/// layer with an adapter, and stores it back the way it was held.
fn change_base_weights(
    model: &mut LlamaForCausalLM,
    change: impl Fn(
        &mut Box<dyn peft_adapters::LinearAdapter>,
        &mut Tensor,
        Option<&mut Tensor>,
    ) -> Result<()>,
) -> Result<()> {
    for (path, lin) in model.linear_layers_mut() {
        if let Some(a) = lin.adapter.as_mut() {
            let mut w = lin.weight.dense();
            change(a, &mut w, lin.bias.as_mut()).with_context(|| path.clone())?;
            lin.weight.replace(&w).with_context(|| path.clone())?;
        }
    }
    Ok(())
}

/// `--merge-for-decoding`: whether generation folds the adapters into the
/// weights before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MergeForDecoding {
    /// On CUDA, where the adapter branch costs two more matmuls per layer
    /// and token; not on the CPU, where it is cheap next to the base matmul
    /// and greedy answers are tested equal to PEFT's unmerged ones.
    #[default]
    Auto,
    /// Always merge the adapters of dense layers.
    #[value(alias = "true")]
    Always,
    /// Never merge: every token runs base + adapter, as PEFT does unmerged.
    #[value(alias = "false")]
    Never,
}

impl MergeForDecoding {
    /// Whether to merge on a CUDA (`on_cuda`) or CPU device: a pure function,
    /// so that the CUDA choice is tested on a CPU.
    pub fn merges(self, on_cuda: bool) -> bool {
        match self {
            Self::Auto => on_cuda,
            Self::Always => true,
            Self::Never => false,
        }
    }
}

/// Folds the adapters of dense layers into their weights for decoding (one
/// matmul per layer instead of three). Layers whose frozen weight is
/// quantized keep their adapters unmerged: merging would quantize the sum
/// again, and a LoRA update is far smaller than one 4-bit step, so nearly
/// all of it would round away (PEFT keeps adapters unmerged on bitsandbytes
/// layers at inference too). Returns (layers merged, quantized layers kept
/// unmerged).
pub fn merge_for_decoding(model: &mut LlamaForCausalLM) -> Result<(usize, usize)> {
    let (mut merged, mut kept) = (0, 0);
    for (path, lin) in model.linear_layers_mut() {
        let Some(a) = lin.adapter.as_mut() else {
            continue;
        };
        if lin.weight.is_quantized() {
            kept += 1;
            continue;
        }
        let mut w = lin.weight.dense();
        if let Some(b) = lin.bias.as_mut() {
            a.merge_bias(b).with_context(|| path.clone())?;
        }
        a.merge(&mut w).with_context(|| path.clone())?;
        lin.weight.replace(&w).with_context(|| path.clone())?;
        merged += 1;
    }
    Ok((merged, kept))
}

/// Restores the base weights after [`merge`] (PEFT's `unmerge_adapter`).
pub fn unmerge(model: &mut LlamaForCausalLM) -> Result<()> {
    change_parameters(model, false);
    change_base_weights(model, |a, w, b| {
        if let Some(b) = b {
            a.unmerge_bias(b)?;
        }
        a.unmerge(w)
    })
}

/// Trainable tensors of the active adapters, keyed by PEFT file key.
pub fn trainable_parameters(model: &LlamaForCausalLM) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (path, lin) in model.linear_layers() {
        if let Some(a) = lin.adapter.as_ref() {
            for (s, t) in a.trainable_tensors() {
                out.insert(key(&path, &s), t);
            }
        }
    }
    let names: std::collections::BTreeSet<String> = model
        .parameter_adapters()
        .into_iter()
        .filter_map(|(_, _, l)| l.as_ref().map(|l| l.name.clone()))
        .collect();
    for name in names {
        out.extend(parameter_tensors(model, &name));
    }
    out
}

/// PEFT's `print_trainable_parameters` line:
/// `trainable params: 1,843,200 || all params: 136,358,784 || trainable%: 1.3517`.
pub fn trainable_parameters_line(model: &LlamaForCausalLM) -> String {
    let trainable: i64 = trainable_parameters(model)
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    let all = model.num_parameters() + trainable;
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(trainable),
        thousands(all),
        100.0 * trainable as f64 / all as f64
    )
}

fn thousands(n: i64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Loads the adapters given on the command line: one is activated as is;
/// several need one weight each and are combined into `combined`.
pub fn load_adapters(
    model: &mut LlamaForCausalLM,
    dirs: &[std::path::PathBuf],
    weights: &[f64],
) -> Result<()> {
    if dirs.is_empty() {
        if !weights.is_empty() {
            bail!("--weights needs --adapter");
        }
        return Ok(());
    }
    check_adapter_weights(dirs.len(), weights)?;
    let names: Vec<String> = (0..dirs.len()).map(|i| format!("adapter{i}")).collect();
    for (dir, name) in dirs.iter().zip(&names) {
        load_adapter(model, dir, name)?;
    }
    if weights.is_empty() {
        set_active(model, &names);
    } else {
        add_weighted_adapter(model, &names, weights, "combined", Combination::Linear)?;
        set_active(model, &["combined".to_owned()]);
    }
    Ok(())
}

/// `--weights` for `adapters` adapters: none for one adapter, else one
/// finite weight each.
pub fn check_adapter_weights(adapters: usize, weights: &[f64]) -> Result<()> {
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        bail!("--weights {w}: each weight must be a finite number");
    }
    match (adapters, weights.len()) {
        (0, _) => bail!("give at least one --adapter DIR"),
        (1, 0) => Ok(()),
        (n, w) if n == w => Ok(()),
        (n, 0) => {
            bail!("{n} adapters given: add --weights with one weight each (e.g. --weights 0.7,0.3)")
        }
        (n, w) => bail!("--weights has {w} values for {n} adapters"),
    }
}
