//! What LoHa and LoKr share, as PEFT's `LycorisConfig` and `LycorisLayer`:
//! rank and alpha (with per-module patterns), rank and module dropout, the
//! targeting fields, and a layer adding ΔW·x with ΔW rebuilt from the
//! method's factors in every forward pass (as PEFT does), merged and
//! unmerged as a dense update. VeRA's layer is this one too, with its own
//! thin forward ([`LycorisWeights::output`]) and shared projections.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use crate::lora::config::pattern;
use crate::lora::targets::{pattern_value, select_modules, TargetModules};
use crate::peft_json;
use crate::{BaseLinear, LayerInput, LinearAdapter};

/// The settings LoHa and LoKr share, with PEFT's field names.
#[derive(Debug, Clone, PartialEq)]
pub struct LycorisConfig {
    /// The rank of each low-rank factor.
    pub r: usize,
    /// scaling = alpha / r.
    pub alpha: f64,
    /// In training, the probability of dropping each output row of ΔW.
    pub rank_dropout: f64,
    /// In training, the probability of skipping the adapter in a forward pass.
    pub module_dropout: f64,
    /// The layers that get an adapter.
    pub target_modules: TargetModules,
    /// Modules never adapted.
    pub exclude_modules: Option<TargetModules>,
    /// Only these decoder-layer indices.
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank overrides: pattern -> r.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides: pattern -> alpha.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// The base model the adapter was trained on (recorded, not enforced).
    pub base_model_name_or_path: Option<String>,
}

impl Default for LycorisConfig {
    /// PEFT's defaults (r 8, alpha 8, no dropout), on the attention's q and v.
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            exclude_modules: None,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
        }
    }
}

/// The fields of [`LycorisConfig`] (and `init_weights`, which both methods
/// have with their own values) in PEFT's files, beyond
/// [`peft_json::COMMON_FIELDS`].
pub const FIELDS: &[&str] = &[
    "r",
    "alpha",
    "rank_dropout",
    "module_dropout",
    "use_effective_conv2d",
    "init_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
];

impl LycorisConfig {
    /// Reads the shared fields of an `adapter_config.json` object that
    /// [`peft_json::object`] has checked.
    pub fn from_json(obj: &Map<String, Value>) -> Result<Self> {
        if obj.get("layers_pattern").is_some_and(|v| !v.is_null()) {
            bail!(
                "`layers_pattern` is not supported (peft-rs finds decoder layers by its own paths)"
            );
        }
        let d = Self::default();
        let c = Self {
            r: peft_json::rank(obj, d.r)?,
            alpha: peft_json::number(obj, "alpha", d.alpha)?,
            rank_dropout: peft_json::number(obj, "rank_dropout", 0.0)?,
            module_dropout: peft_json::number(obj, "module_dropout", 0.0)?,
            target_modules: peft_json::targets(obj, "target_modules")?
                .ok_or_else(|| anyhow::anyhow!("`target_modules` missing"))?,
            exclude_modules: peft_json::targets(obj, "exclude_modules")?,
            layers_to_transform: peft_json::layers(obj)?,
            rank_pattern: pattern(obj, "rank_pattern", "an integer", |v| {
                v.as_u64().map(|x| x as usize)
            })?,
            alpha_pattern: pattern(obj, "alpha_pattern", "a number", Value::as_f64)?,
            base_model_name_or_path: peft_json::base_model(obj),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks values PEFT would also refuse, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || self.rank_pattern.values().any(|&r| r == 0) {
            bail!("`r` (and every `rank_pattern` value) must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("`alpha` must be a finite number > 0, got {}", self.alpha);
        }
        for (k, p) in [
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                bail!("`{k}` must be in [0, 1), got {p}");
            }
        }
        Ok(())
    }

    /// The shared part of the `adapter_config.json` PEFT writes for
    /// `peft_type`; each method adds its own fields.
    pub fn to_json(&self, peft_type: &str) -> Map<String, Value> {
        let v = json!({
            "alpha": self.alpha,
            "alpha_pattern": self.alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "exclude_modules": self.exclude_modules.as_ref().map(TargetModules::to_json),
            "inference_mode": true,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "module_dropout": self.module_dropout,
            "modules_to_save": null,
            "peft_type": peft_type,
            "r": self.r,
            "rank_dropout": self.rank_dropout,
            "rank_pattern": self.rank_pattern,
            "revision": null,
            "target_modules": self.target_modules.to_json(),
            "task_type": "CAUSAL_LM",
            "use_effective_conv2d": false,
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }

    /// Which of `linear_paths` get an adapter.
    pub fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>> {
        self.validate()?;
        select_modules(
            &self.target_modules,
            self.exclude_modules.as_ref(),
            self.layers_to_transform.as_deref(),
            linear_paths,
            output_head,
        )
    }

    /// Rank and scaling (alpha / r) of the module at `path`.
    pub fn rank_and_scaling(&self, path: &str) -> (i64, f64) {
        let r = pattern_value(&self.rank_pattern, path).unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path).unwrap_or(self.alpha);
        (r as i64, alpha / r as f64)
    }

    /// The dropout settings of every layer.
    pub fn dropout(&self, rescale_rank_dropout: bool) -> Dropout {
        Dropout {
            rank: self.rank_dropout,
            module: self.module_dropout,
            rescale_rank: rescale_rank_dropout,
        }
    }
}

/// A fresh `[rows, fan_in]` tensor drawn as PEFT's
/// `kaiming_uniform_(a=√5)`: U(-1/√fan_in, 1/√fan_in), from libtorch's CPU
/// generator.
pub fn kaiming(rows: i64, fan_in: i64) -> Tensor {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::empty([rows, fan_in], (Kind::Float, Device::Cpu)).uniform_(-bound, bound)
}

/// Training-only dropout of a LyCORIS adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// The probability of dropping each output row of ΔW.
    pub rank: f64,
    /// The probability of skipping the adapter in a forward pass.
    pub module: f64,
    /// Rescale the kept rows by the share kept (LoHa always; LoKr with
    /// `rank_dropout_scale`).
    pub rescale_rank: bool,
}

/// One method's weights on one layer (fp32): what [`LycorisLayer`] needs.
pub trait LycorisWeights: Send {
    /// The method's name, for messages.
    const METHOD: &'static str;
    /// ΔW, `[out, in]`, fp32, scaled, without dropout.
    fn delta(&self) -> Tensor;
    /// The trainable tensors under their names in PEFT's files.
    fn named(&self) -> Vec<(String, Tensor)>;
    /// The training-only rank and module dropout.
    fn dropout(&self) -> Dropout;
    /// The adapter's output for the fp32 input `x` computed without forming
    /// ΔW, where the method does so (VeRA); `None`: x·ΔWᵀ.
    fn output(&self, _x: &Tensor, _training: bool) -> Option<Tensor> {
        None
    }
    /// Tensors every layer shares, saved once (see [`LinearAdapter::shared_state`]).
    fn shared(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
}

/// The adapters of one LyCORIS method attached to one linear layer.
pub struct LycorisLayer<W> {
    adapters: BTreeMap<String, W>,
    active: Vec<String>,
    merged: Vec<String>,
    training: bool,
}

impl<W: LycorisWeights> LycorisLayer<W> {
    /// A layer carrying one active adapter.
    pub fn new(name: &str, weights: W) -> Self {
        Self {
            adapters: [(name.to_owned(), weights)].into(),
            active: vec![name.to_owned()],
            merged: vec![],
            training: false,
        }
    }

    fn active_unmerged(&self) -> impl Iterator<Item = (&String, &W)> {
        self.active
            .iter()
            .filter(|n| !self.merged.contains(n))
            .filter_map(|n| self.adapters.get_key_value(n))
    }
}

/// A uniform draw in [0, 1) from libtorch's CPU generator (PEFT's `torch.rand`).
fn rand(n: i64) -> Tensor {
    Tensor::rand([n], (Kind::Float, Device::Cpu))
}

/// ΔW with PEFT's rank dropout: each output row kept with probability
/// 1 − p, the kept ones rescaled by the share actually kept when asked.
fn rank_dropped(delta: Tensor, d: Dropout) -> Tensor {
    let keep = rand(delta.size()[0])
        .gt(d.rank)
        .to_kind(Kind::Float)
        .to_device(delta.device());
    let keep = if d.rescale_rank {
        &keep / keep.mean(Kind::Float)
    } else {
        keep
    };
    delta * keep.unsqueeze(1)
}

impl<W: LycorisWeights> LinearAdapter for LycorisLayer<W> {
    fn forward(&self, input: &LayerInput, base_output: Tensor, _base: &BaseLinear) -> Tensor {
        let kind = base_output.kind();
        let mut out: Option<Tensor> = None;
        for (_, w) in self.active_unmerged() {
            let d = w.dropout();
            // PEFT draws the module-dropout number only in training.
            if self.training && rand(1).double_value(&[0]) <= d.module {
                continue;
            }
            let x = input.derived(&format!("{:?}", Kind::Float), |x| x.to_kind(Kind::Float));
            let y = w.output(&x, self.training).unwrap_or_else(|| {
                let delta = w.delta();
                let delta = if self.training && d.rank > 0.0 {
                    rank_dropped(delta, d)
                } else {
                    delta
                };
                x.linear::<Tensor>(&delta, None)
            });
            let sum = out.unwrap_or_else(|| base_output.shallow_clone());
            // As PEFT: the base output plus the fp32 activations (promoted), cast at the end.
            out = Some(sum + y);
        }
        match out {
            Some(y) => y.to_kind(kind),
            None => base_output,
        }
    }

    fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.active
            .iter()
            .filter_map(|n| self.adapters.get(n))
            .flat_map(W::named)
            .collect()
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn merge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        let names: Vec<String> = self.active_unmerged().map(|(n, _)| n.clone()).collect();
        for name in names {
            let new = weight.to_kind(Kind::Float) + self.adapters[&name].delta();
            if !bool::try_from(new.isfinite().all())? {
                bail!(
                    "merging {} adapter `{name}` gives NaN or inf weights; the adapter is broken",
                    W::METHOD
                );
            }
            *weight = new.to_kind(weight.kind());
            self.merged.push(name);
        }
        Ok(())
    }

    fn unmerge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        while let Some(name) = self.merged.pop() {
            let w = &self.adapters[&name];
            *weight = (weight.to_kind(Kind::Float) - w.delta()).to_kind(weight.kind());
        }
        Ok(())
    }

    fn state_dict(&self, name: &str) -> Vec<(String, Tensor)> {
        self.adapters.get(name).map(W::named).unwrap_or_default()
    }

    fn shared_state(&self, name: &str) -> Vec<(String, Tensor)> {
        self.adapters.get(name).map(W::shared).unwrap_or_default()
    }

    fn set_active(&mut self, names: &[String]) {
        self.active = crate::held_names(names, |n| self.adapters.contains_key(n));
    }
}
