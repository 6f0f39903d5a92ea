//! `LoHaConfig`: PEFT's field names and meanings, read from and written to
//! `adapter_config.json`.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::lora::config::pattern;
use crate::lora::targets::{pattern_value, select_modules, TargetModules};
use crate::peft_json;

/// A LoHa adapter's configuration, with PEFT's field names.
#[derive(Debug, Clone, PartialEq)]
pub struct LohaConfig {
    /// Rank of each of the two products.
    pub r: usize,
    /// scaling = alpha / r.
    pub alpha: f64,
    /// In training, the probability of dropping each output row of ΔW (the
    /// kept rows rescaled by the kept share, as PEFT does).
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
    /// Start with ΔW = 0 (W2b zero), else every factor kaiming-uniform.
    pub init_weights: bool,
    /// The base model the adapter was trained on (recorded, not enforced).
    pub base_model_name_or_path: Option<String>,
}

impl Default for LohaConfig {
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
            init_weights: true,
            base_model_name_or_path: None,
        }
    }
}

/// PEFT `LoHaConfig` fields peft-rs reads, beyond [`peft_json::COMMON_FIELDS`].
const KNOWN_FIELDS: &[&str] = &[
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

impl LohaConfig {
    /// Parses PEFT's JSON, refusing options peft-rs does not implement.
    pub fn from_json(json: &Value) -> Result<Self> {
        let obj = peft_json::object(json, KNOWN_FIELDS, "LoHaConfig")?;
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
                .context("`target_modules` missing")?,
            exclude_modules: peft_json::targets(obj, "exclude_modules")?,
            layers_to_transform: peft_json::layers(obj)?,
            rank_pattern: pattern(obj, "rank_pattern", "an integer", |v| {
                v.as_u64().map(|x| x as usize)
            })?,
            alpha_pattern: pattern(obj, "alpha_pattern", "a number", Value::as_f64)?,
            init_weights: peft_json::boolean(obj, "init_weights", true)?,
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

    /// The `adapter_config.json` PEFT writes for this configuration.
    pub fn to_json(&self) -> Value {
        json!({
            "alpha": self.alpha,
            "alpha_pattern": self.alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "exclude_modules": self.exclude_modules.as_ref().map(TargetModules::to_json),
            "inference_mode": true,
            "init_weights": self.init_weights,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "module_dropout": self.module_dropout,
            "modules_to_save": null,
            "peft_type": "LOHA",
            "r": self.r,
            "rank_dropout": self.rank_dropout,
            "rank_pattern": self.rank_pattern,
            "revision": null,
            "target_modules": self.target_modules.to_json(),
            "task_type": "CAUSAL_LM",
            "use_effective_conv2d": false,
        })
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
}
