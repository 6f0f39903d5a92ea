//! `VeraConfig`: PEFT's field names and meanings, read from and written to
//! `adapter_config.json`, and the shared projections PEFT draws.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::lora::targets::{select_modules, TargetModules};
use crate::peft_json;

/// A VeRA adapter's configuration, with PEFT's field names.
#[derive(Debug, Clone, PartialEq)]
pub struct VeraConfig {
    /// The rank of the shared projections (one for every layer).
    pub r: usize,
    /// The layers that get an adapter.
    pub target_modules: TargetModules,
    /// Modules never adapted.
    pub exclude_modules: Option<TargetModules>,
    /// Only these decoder-layer indices.
    pub layers_to_transform: Option<Vec<usize>>,
    /// The seed of the shared projections.
    pub projection_prng_key: u64,
    /// Save the projections in the adapter file (else they are drawn again
    /// from `projection_prng_key` when loading).
    pub save_projection: bool,
    /// Dropout on the adapter's input in training.
    pub vera_dropout: f64,
    /// λ_d's starting value (λ_b starts at zero, so ΔW = 0).
    pub d_initial: f64,
    /// Start as above, else λ_b ones and λ_d N(0, 1) (ΔW ≠ 0).
    pub init_weights: bool,
    /// The base model the adapter was trained on (recorded, not enforced).
    pub base_model_name_or_path: Option<String>,
}

impl Default for VeraConfig {
    /// PEFT's defaults (r 256, key 0, projections saved, d_initial 0.1),
    /// on the attention's q and v.
    fn default() -> Self {
        Self {
            r: 256,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            exclude_modules: None,
            layers_to_transform: None,
            projection_prng_key: 0,
            save_projection: true,
            vera_dropout: 0.0,
            d_initial: 0.1,
            init_weights: true,
            base_model_name_or_path: None,
        }
    }
}

/// PEFT `VeraConfig` fields peft-rs reads, beyond [`peft_json::COMMON_FIELDS`].
const KNOWN_FIELDS: &[&str] = &[
    "r",
    "projection_prng_key",
    "save_projection",
    "vera_dropout",
    "d_initial",
    "fan_in_fan_out",
    "bias",
    "init_weights",
    "layers_to_transform",
    "layers_pattern",
];

/// The names of the shared projections in PEFT's files (`base_model.vera_A`, ...).
pub const PROJECTIONS: [&str; 2] = ["vera_A", "vera_B"];

impl VeraConfig {
    /// Parses PEFT's JSON, refusing options peft-rs does not implement.
    pub fn from_json(json: &Value) -> Result<Self> {
        let obj = peft_json::object(json, KNOWN_FIELDS, "VeraConfig")?;
        if obj.get("layers_pattern").is_some_and(|v| !v.is_null()) {
            bail!(
                "`layers_pattern` is not supported (peft-rs finds decoder layers by its own paths)"
            );
        }
        match obj.get("bias") {
            None | Some(Value::Null) => {}
            Some(Value::String(b)) if b == "none" => {}
            Some(b) => {
                bail!("`bias` = {b} is not supported (VeRA adapters without bias: \"none\")")
            }
        }
        let key = match obj.get("projection_prng_key") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().with_context(|| {
                format!("`projection_prng_key` must be an integer >= 0, found {v}")
            })?,
        };
        let d = Self::default();
        let c = Self {
            r: peft_json::rank(obj, d.r)?,
            target_modules: peft_json::targets(obj, "target_modules")?
                .context("`target_modules` missing")?,
            exclude_modules: peft_json::targets(obj, "exclude_modules")?,
            layers_to_transform: peft_json::layers(obj)?,
            projection_prng_key: key,
            save_projection: peft_json::boolean(obj, "save_projection", true)?,
            vera_dropout: peft_json::number(obj, "vera_dropout", 0.0)?,
            d_initial: peft_json::number(obj, "d_initial", d.d_initial)?,
            init_weights: peft_json::boolean(obj, "init_weights", true)?,
            base_model_name_or_path: peft_json::base_model(obj),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks values PEFT would also refuse, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("`r` must be at least 1");
        }
        if !(0.0..1.0).contains(&self.vera_dropout) {
            bail!(
                "`vera_dropout` must be in [0, 1), got {}",
                self.vera_dropout
            );
        }
        if !self.d_initial.is_finite() {
            bail!(
                "`d_initial` must be a finite number, got {}",
                self.d_initial
            );
        }
        Ok(())
    }

    /// The `adapter_config.json` PEFT writes for this configuration.
    pub fn to_json(&self) -> Value {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "d_initial": self.d_initial,
            "exclude_modules": self.exclude_modules.as_ref().map(TargetModules::to_json),
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_weights": self.init_weights,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "modules_to_save": null,
            "peft_type": "VERA",
            "projection_prng_key": self.projection_prng_key,
            "r": self.r,
            "revision": null,
            "save_projection": self.save_projection,
            "target_modules": self.target_modules.to_json(),
            "task_type": "CAUSAL_LM",
            "vera_dropout": self.vera_dropout,
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

    /// The shapes of A `[r, max in]` and B `[max out, r]`, over the adapted
    /// modules' `(in, out)`: each layer uses their top-left corner.
    pub fn projection_shapes(&self, dims: &[(i64, i64)]) -> [Vec<i64>; 2] {
        let max_in = dims.iter().map(|d| d.0).max().unwrap_or(0);
        let max_out = dims.iter().map(|d| d.1).max().unwrap_or(0);
        let r = self.r as i64;
        [vec![r, max_in], vec![max_out, r]]
    }

    /// A and B as PEFT draws them: kaiming-uniform (gain √2, fan in) from a
    /// CPU generator seeded with `projection_prng_key`, A first. libtorch's
    /// one global generator stands in for PEFT's private one (the same
    /// Mersenne Twister, seeded alike), so this reseeds it.
    pub fn fresh_projections(&self, dims: &[(i64, i64)]) -> [Tensor; 2] {
        let [a, b] = self.projection_shapes(dims);
        crate::rng::with_torch_seed(self.projection_prng_key, || {
            let draw = |shape: &[i64]| {
                let bound = (6.0 / shape[1] as f64).sqrt();
                Tensor::empty(shape, (Kind::Float, Device::Cpu)).uniform_(-bound, bound)
            };
            [draw(&a), draw(&b)]
        })
    }
}
