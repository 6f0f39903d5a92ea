//! An adapter directory's method, chosen by the `peft_type` of its
//! `adapter_config.json`, with that method's configuration.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use tch::Tensor;

use crate::ia3::{Ia3Config, Ia3Layer};
use crate::loha::{LohaConfig, LohaLayer, LohaWeights};
use crate::lokr::{LokrConfig, LokrLayer, LokrWeights};
use crate::lora::LoraConfig;
use crate::vera::config::PROJECTIONS;
use crate::vera::{VeraConfig, VeraLayer, VeraWeights};
use crate::LinearAdapter;

/// What peft-rs needs of an adapter method other than LoRA (whose
/// initialisations and combinations take their own path) to inject, load,
/// save and merge it: which modules it adapts, the tensors it keeps on each
/// (and those every module shares, as VeRA's projections), how PEFT makes
/// fresh ones, and the layer that holds them.
pub trait Method {
    /// Which of `linear_paths` the adapter adapts.
    fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>>;

    /// The `target_modules` setting (`select` applies it).
    fn target_modules(&self) -> &crate::lora::TargetModules;

    /// The tensors kept on module `path` of a base layer `[out, in]`: their
    /// names in PEFT's files (after the module path) and shapes.
    fn tensor_shapes(&self, path: &str, in_f: i64, out_f: i64) -> Vec<(String, Vec<i64>)>;

    /// Fresh tensors for module `path`, in [`Method::tensor_shapes`]' order,
    /// drawn from libtorch's CPU generator as PEFT draws them (fp32, CPU).
    fn fresh(&self, path: &str, in_f: i64, out_f: i64) -> Vec<Tensor>;

    /// The tensors all adapted modules share, given their `(in, out)`:
    /// names in PEFT's files (after `base_model.`) and shapes; none by default.
    fn shared_shapes(&self, _dims: &[(i64, i64)]) -> Vec<(String, Vec<i64>)> {
        Vec::new()
    }

    /// Whether the shared tensors are in the adapter file; when not, they
    /// are made again by [`Method::fresh_shared`] on loading.
    fn shared_saved(&self) -> bool {
        true
    }

    /// Fresh shared tensors, in [`Method::shared_shapes`]' order (fp32, CPU),
    /// drawn after every module's [`Method::fresh`] ones.
    fn fresh_shared(&self, _dims: &[(i64, i64)]) -> Vec<Tensor> {
        Vec::new()
    }

    /// The layer holding adapter `name` on module `path` (`[out, in]`) with
    /// `tensors` (fp32, in [`Method::tensor_shapes`]' order) and the
    /// `shared` ones.
    fn layer(
        &self,
        path: &str,
        dims: (i64, i64),
        name: &str,
        tensors: Vec<Tensor>,
        shared: &[Tensor],
    ) -> Box<dyn LinearAdapter>;
}

/// A method adapter's tensors, read from its directory and checked against
/// the base: per adapted module (fp32), and the shared ones.
pub struct MethodTensors {
    /// Module path -> its tensors, in [`Method::tensor_shapes`]' order.
    pub modules: std::collections::BTreeMap<String, Vec<Tensor>>,
    /// The shared tensors, from the file or made again.
    pub shared: Vec<Tensor>,
}

/// Reads `DIR/adapter_model.safetensors` of a `method` adapter on the
/// modules `adapted` (path, in, out): every tensor present with the shape
/// the base needs, nothing else, all finite.
pub fn read_tensors(
    dir: &Path,
    method: &dyn Method,
    adapted: &[(String, i64, i64)],
) -> Result<MethodTensors> {
    use crate::lora::files;
    let file = dir.join(files::WEIGHTS_FILE);
    let mut found = files::read_weights(dir)?;
    let per_module = |p: &str, i: i64, o: i64| -> Vec<(String, Vec<i64>)> {
        method
            .tensor_shapes(p, i, o)
            .into_iter()
            .map(|(s, shape)| (files::key(p, &s), shape))
            .collect()
    };
    let dims: Vec<(i64, i64)> = adapted.iter().map(|(_, i, o)| (*i, *o)).collect();
    let shared_keys: Vec<(String, Vec<i64>)> = if method.shared_saved() {
        method
            .shared_shapes(&dims)
            .into_iter()
            .map(|(s, shape)| (format!("base_model.{s}"), shape))
            .collect()
    } else {
        Vec::new()
    };
    let mut expected: Vec<(String, Vec<i64>)> = adapted
        .iter()
        .flat_map(|(p, i, o)| per_module(p, *i, *o))
        .collect();
    expected.extend(shared_keys.iter().cloned());
    files::check_tensors(&file, &expected, &found)?;
    let mut take = |k: &str| -> Result<Tensor> {
        let t = found.remove(k).expect("checked");
        if !bool::try_from(t.isfinite().all())? {
            bail!(
                "{}: tensor {k} holds NaN or inf; the adapter is broken",
                file.display()
            );
        }
        Ok(t.to_kind(tch::Kind::Float))
    };
    let mut modules = std::collections::BTreeMap::new();
    for (p, i, o) in adapted {
        let ts = per_module(p, *i, *o)
            .iter()
            .map(|(k, _)| take(k))
            .collect::<Result<Vec<_>>>()?;
        modules.insert(p.clone(), ts);
    }
    let shared = if method.shared_saved() {
        shared_keys
            .iter()
            .map(|(k, _)| take(k))
            .collect::<Result<Vec<_>>>()?
    } else {
        method.fresh_shared(&dims)
    };
    Ok(MethodTensors { modules, shared })
}

impl Method for Ia3Config {
    fn target_modules(&self) -> &crate::lora::TargetModules {
        &self.target_modules
    }

    fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>> {
        Ia3Config::select(self, linear_paths, output_head)
    }

    fn tensor_shapes(&self, path: &str, in_f: i64, out_f: i64) -> Vec<(String, Vec<i64>)> {
        vec![("ia3_l".to_owned(), self.vector_shape(path, in_f, out_f))]
    }

    fn fresh(&self, path: &str, in_f: i64, out_f: i64) -> Vec<Tensor> {
        let shape = self.vector_shape(path, in_f, out_f);
        // PEFT draws the normal values even when it then sets them to one.
        let l = Tensor::randn(shape.as_slice(), (tch::Kind::Float, tch::Device::Cpu));
        vec![if self.init_ia3_weights {
            l.ones_like()
        } else {
            l
        }]
    }

    fn layer(
        &self,
        path: &str,
        _dims: (i64, i64),
        name: &str,
        mut tensors: Vec<Tensor>,
        _shared: &[Tensor],
    ) -> Box<dyn LinearAdapter> {
        let l = tensors.remove(0);
        Box::new(Ia3Layer::new(name, l, self.is_feedforward(path)))
    }
}

impl Method for LohaConfig {
    fn target_modules(&self) -> &crate::lora::TargetModules {
        &self.lycoris.target_modules
    }

    fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>> {
        self.lycoris.select(linear_paths, output_head)
    }

    fn tensor_shapes(&self, path: &str, in_f: i64, out_f: i64) -> Vec<(String, Vec<i64>)> {
        let (r, _) = self.lycoris.rank_and_scaling(path);
        let shapes = [vec![out_f, r], vec![r, in_f], vec![out_f, r], vec![r, in_f]];
        crate::loha::layer::FACTORS
            .iter()
            .zip(shapes)
            .map(|(n, s)| (n.to_string(), s))
            .collect()
    }

    fn fresh(&self, path: &str, in_f: i64, out_f: i64) -> Vec<Tensor> {
        let (r, _) = self.lycoris.rank_and_scaling(path);
        LohaWeights::fresh(out_f, in_f, r, self.init_weights).into()
    }

    fn layer(
        &self,
        path: &str,
        _dims: (i64, i64),
        name: &str,
        tensors: Vec<Tensor>,
        _shared: &[Tensor],
    ) -> Box<dyn LinearAdapter> {
        let (_, scaling) = self.lycoris.rank_and_scaling(path);
        let [w1a, w1b, w2a, w2b]: [Tensor; 4] = tensors.try_into().expect("four LoHa factors");
        Box::new(LohaLayer::new(
            name,
            LohaWeights {
                w1a,
                w1b,
                w2a,
                w2b,
                scaling,
                dropout: self.lycoris.dropout(true),
            },
        ))
    }
}

impl Method for LokrConfig {
    fn target_modules(&self) -> &crate::lora::TargetModules {
        &self.lycoris.target_modules
    }

    fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>> {
        self.lycoris.select(linear_paths, output_head)
    }

    fn tensor_shapes(&self, path: &str, in_f: i64, out_f: i64) -> Vec<(String, Vec<i64>)> {
        self.layout(path, in_f, out_f).tensor_shapes()
    }

    fn fresh(&self, path: &str, in_f: i64, out_f: i64) -> Vec<Tensor> {
        LokrWeights::fresh(&self.layout(path, in_f, out_f), self.init_weights)
    }

    fn layer(
        &self,
        path: &str,
        (in_f, out_f): (i64, i64),
        name: &str,
        tensors: Vec<Tensor>,
        _shared: &[Tensor],
    ) -> Box<dyn LinearAdapter> {
        let (_, scaling) = self.lycoris.rank_and_scaling(path);
        let dropout = self.lycoris.dropout(self.rank_dropout_scale);
        let layout = self.layout(path, in_f, out_f);
        Box::new(LokrLayer::new(
            name,
            LokrWeights::new(&layout, tensors, scaling, dropout),
        ))
    }
}

impl Method for VeraConfig {
    fn target_modules(&self) -> &crate::lora::TargetModules {
        &self.target_modules
    }

    fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>> {
        VeraConfig::select(self, linear_paths, output_head)
    }

    fn tensor_shapes(&self, _path: &str, _in_f: i64, out_f: i64) -> Vec<(String, Vec<i64>)> {
        vec![
            ("vera_lambda_b".to_owned(), vec![out_f]),
            ("vera_lambda_d".to_owned(), vec![self.r as i64]),
        ]
    }

    fn fresh(&self, _path: &str, _in_f: i64, out_f: i64) -> Vec<Tensor> {
        let opts = (tch::Kind::Float, tch::Device::Cpu);
        // PEFT draws λ_d even when it then sets it to d_initial.
        let mut d = Tensor::randn([self.r as i64], opts);
        if self.init_weights {
            vec![Tensor::zeros([out_f], opts), d.fill_(self.d_initial)]
        } else {
            vec![Tensor::ones([out_f], opts), d]
        }
    }

    fn shared_shapes(&self, dims: &[(i64, i64)]) -> Vec<(String, Vec<i64>)> {
        PROJECTIONS
            .iter()
            .map(|n| n.to_string())
            .zip(self.projection_shapes(dims))
            .collect()
    }

    fn shared_saved(&self) -> bool {
        self.save_projection
    }

    fn fresh_shared(&self, dims: &[(i64, i64)]) -> Vec<Tensor> {
        self.fresh_projections(dims).into()
    }

    fn layer(
        &self,
        _path: &str,
        (in_f, _): (i64, i64),
        name: &str,
        tensors: Vec<Tensor>,
        shared: &[Tensor],
    ) -> Box<dyn LinearAdapter> {
        let [lambda_b, lambda_d]: [Tensor; 2] = tensors.try_into().expect("two VeRA vectors");
        let [a, b] = shared else {
            panic!("VeRA layers need the two shared projections")
        };
        // The projections are frozen: PEFT keeps them as buffers.
        Box::new(VeraLayer::new(
            name,
            VeraWeights {
                lambda_b,
                lambda_d,
                a: a.detach(),
                b: b.detach(),
                in_features: in_f,
                dropout: self.vera_dropout,
                save_projection: self.save_projection,
            },
        ))
    }
}

/// The configuration of an adapter of any method peft-rs implements.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterConfig {
    /// `peft_type` LORA (with rsLoRA, DoRA, PiSSA/OLoRA starts).
    Lora(LoraConfig),
    /// `peft_type` IA3.
    Ia3(Ia3Config),
    /// `peft_type` LOHA.
    Loha(LohaConfig),
    /// `peft_type` LOKR.
    Lokr(LokrConfig),
    /// `peft_type` VERA.
    Vera(VeraConfig),
}

impl From<VeraConfig> for AdapterConfig {
    fn from(c: VeraConfig) -> Self {
        Self::Vera(c)
    }
}

impl From<LokrConfig> for AdapterConfig {
    fn from(c: LokrConfig) -> Self {
        Self::Lokr(c)
    }
}

impl From<LohaConfig> for AdapterConfig {
    fn from(c: LohaConfig) -> Self {
        Self::Loha(c)
    }
}

impl From<LoraConfig> for AdapterConfig {
    fn from(c: LoraConfig) -> Self {
        Self::Lora(c)
    }
}

impl From<Ia3Config> for AdapterConfig {
    fn from(c: Ia3Config) -> Self {
        Self::Ia3(c)
    }
}

impl AdapterConfig {
    /// Reads `DIR/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let (path, json) = crate::peft_json::read(dir)?;
        Self::from_json(&json).with_context(|| path.display().to_string())
    }

    /// Parses PEFT's JSON for the method its `peft_type` names.
    pub fn from_json(json: &Value) -> Result<Self> {
        match json.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => Ok(Self::Lora(LoraConfig::from_json(json)?)),
            Some("IA3") => Ok(Self::Ia3(Ia3Config::from_json(json)?)),
            Some("LOHA") => Ok(Self::Loha(LohaConfig::from_json(json)?)),
            Some("LOKR") => Ok(Self::Lokr(LokrConfig::from_json(json)?)),
            Some("VERA") => Ok(Self::Vera(VeraConfig::from_json(json)?)),
            Some(other) => bail!(
                "`peft_type` is `{other}`; peft-rs reads LORA, IA3, LOHA, LOKR and VERA adapters (the other PEFT methods are not implemented)"
            ),
            None => bail!("`peft_type` missing (PEFT writes \"LORA\", \"IA3\", ...)"),
        }
    }

    /// The `adapter_config.json` PEFT writes for this configuration.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Lora(c) => c.to_json(),
            Self::Ia3(c) => c.to_json(),
            Self::Loha(c) => c.to_json(),
            Self::Lokr(c) => c.to_json(),
            Self::Vera(c) => c.to_json(),
        }
    }

    /// The method's name, for messages.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Lora(_) => "LoRA",
            Self::Ia3(_) => "IA³",
            Self::Loha(_) => "LoHa",
            Self::Lokr(_) => "LoKr",
            Self::Vera(_) => "VeRA",
        }
    }

    /// Which of `linear_paths` the adapter adapts.
    pub fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>> {
        match self {
            Self::Lora(c) => c
                .validate()
                .and_then(|()| c.select(linear_paths, output_head)),
            Self::Ia3(c) => c.select(linear_paths, output_head),
            Self::Loha(c) => c.lycoris.select(linear_paths, output_head),
            Self::Lokr(c) => c.lycoris.select(linear_paths, output_head),
            Self::Vera(c) => c.select(linear_paths, output_head),
        }
    }

    /// The LoRA configuration, or an error naming `what` cannot take this method.
    pub fn lora(&self, what: &str) -> Result<&LoraConfig> {
        match self {
            Self::Lora(c) => Ok(c),
            other => bail!(
                "{what} takes LoRA adapters; this is an {} adapter",
                other.method()
            ),
        }
    }

    /// The base model recorded in the configuration.
    pub fn set_base_model(&mut self, base: Option<String>) {
        match self {
            Self::Lora(c) => c.base_model_name_or_path = base,
            Self::Ia3(c) => c.base_model_name_or_path = base,
            Self::Loha(c) => c.lycoris.base_model_name_or_path = base,
            Self::Lokr(c) => c.lycoris.base_model_name_or_path = base,
            Self::Vera(c) => c.base_model_name_or_path = base,
        }
    }

    /// The method's parts for a method other than LoRA.
    pub fn as_method(&self) -> Option<&dyn Method> {
        match self {
            Self::Lora(_) => None,
            Self::Ia3(c) => Some(c),
            Self::Loha(c) => Some(c),
            Self::Lokr(c) => Some(c),
            Self::Vera(c) => Some(c),
        }
    }

    /// Sets `target_modules` to `targets`.
    pub fn set_target_modules(&mut self, targets: crate::lora::TargetModules) {
        match self {
            Self::Lora(c) => c.target_modules = targets,
            Self::Ia3(c) => c.target_modules = targets,
            Self::Loha(c) => c.lycoris.target_modules = targets,
            Self::Lokr(c) => c.lycoris.target_modules = targets,
            Self::Vera(c) => c.target_modules = targets,
        }
    }
}
