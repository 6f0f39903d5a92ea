//! `IA3Config`: PEFT's field names and meanings, read from and written to
//! `adapter_config.json`.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::lora::targets::{select_modules, TargetModules};
use crate::peft_json;

/// An IA³ adapter's configuration, with PEFT's field names.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Config {
    /// The layers that get a vector.
    pub target_modules: TargetModules,
    /// Modules never adapted: a regex (whole path) or names (suffix match).
    pub exclude_modules: Option<TargetModules>,
    /// The targeted layers whose *input* is rescaled (PEFT: a regex matching
    /// the whole path, or names a path ends with); the others rescale their output.
    pub feedforward_modules: TargetModules,
    /// Start at ones (the adapter changes nothing), else N(0, 1) as PEFT's `torch.randn`.
    pub init_ia3_weights: bool,
    /// The base model the adapter was trained on (recorded, not enforced).
    pub base_model_name_or_path: Option<String>,
}

impl Default for Ia3Config {
    /// PEFT's defaults for Llama-family models: the key and value
    /// projections and `down_proj`, which is the feed-forward module.
    fn default() -> Self {
        Self {
            target_modules: TargetModules::Names(vec![
                "k_proj".into(),
                "v_proj".into(),
                "down_proj".into(),
            ]),
            exclude_modules: None,
            feedforward_modules: TargetModules::Names(vec!["down_proj".into()]),
            init_ia3_weights: true,
            base_model_name_or_path: None,
        }
    }
}

/// PEFT `IA3Config` fields peft-rs reads, beyond [`peft_json::COMMON_FIELDS`].
const KNOWN_FIELDS: &[&str] = &["feedforward_modules", "init_ia3_weights", "fan_in_fan_out"];

impl Ia3Config {
    /// Parses PEFT's JSON, refusing options peft-rs does not implement.
    pub fn from_json(json: &Value) -> Result<Self> {
        let obj = peft_json::object(json, KNOWN_FIELDS, "IA3Config")?;
        let c = Self {
            target_modules: peft_json::targets(obj, "target_modules")?
                .context("`target_modules` missing")?,
            exclude_modules: peft_json::targets(obj, "exclude_modules")?,
            feedforward_modules: peft_json::targets(obj, "feedforward_modules")?.context(
                "`feedforward_modules` missing (PEFT writes the modules whose input IA³ rescales, e.g. [\"down_proj\"])",
            )?,
            init_ia3_weights: peft_json::boolean(obj, "init_ia3_weights", true)?,
            base_model_name_or_path: peft_json::base_model(obj),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks what PEFT checks: `feedforward_modules` names only targeted
    /// modules (when both are lists), and neither is `all-linear` for
    /// feed-forward modules.
    pub fn validate(&self) -> Result<()> {
        if let (TargetModules::Names(t), TargetModules::Names(f)) =
            (&self.target_modules, &self.feedforward_modules)
        {
            if let Some(x) = f.iter().find(|x| !t.contains(x)) {
                bail!("`feedforward_modules` lists `{x}`, which `target_modules` does not: it must be a subset (as PEFT requires)");
            }
        }
        if self.feedforward_modules == TargetModules::AllLinear {
            bail!("`feedforward_modules` must name modules or be a regex, not all-linear");
        }
        if let TargetModules::Names(t) = &self.target_modules {
            if t.is_empty() || t.iter().any(String::is_empty) {
                bail!("`target_modules` must name at least one module");
            }
        }
        Ok(())
    }

    /// The `adapter_config.json` PEFT writes for this configuration.
    pub fn to_json(&self) -> Value {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "exclude_modules": self.exclude_modules.as_ref().map(TargetModules::to_json),
            "fan_in_fan_out": false,
            "feedforward_modules": self.feedforward_modules.to_json(),
            "inference_mode": true,
            "init_ia3_weights": self.init_ia3_weights,
            "modules_to_save": null,
            "peft_type": "IA3",
            "revision": null,
            "target_modules": self.target_modules.to_json(),
            "task_type": "CAUSAL_LM",
        })
    }

    /// Which of `linear_paths` get a vector.
    pub fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>> {
        self.validate()?;
        select_modules(
            &self.target_modules,
            self.exclude_modules.as_ref(),
            None,
            linear_paths,
            output_head,
        )
    }

    /// Whether the module at `path` rescales its input: PEFT's
    /// `_check_target_module_feedforward` (a regex matching the whole path,
    /// or a name the path ends with — plain `endswith`, as PEFT tests it).
    pub fn is_feedforward(&self, path: &str) -> bool {
        match &self.feedforward_modules {
            TargetModules::Regex(r) => {
                regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(path))
            }
            TargetModules::Names(names) => names.iter().any(|n| path.ends_with(n.as_str())),
            TargetModules::AllLinear => false,
        }
    }

    /// The shape of the vector of a layer `[out, in]`: `[1, in]` on a
    /// feed-forward module, `[out, 1]` elsewhere.
    pub fn vector_shape(&self, path: &str, in_features: i64, out_features: i64) -> Vec<i64> {
        if self.is_feedforward(path) {
            vec![1, in_features]
        } else {
            vec![out_features, 1]
        }
    }
}
