//! `LoHaConfig`: PEFT's field names and meanings, read from and written to
//! `adapter_config.json`.

use anyhow::Result;
use serde_json::{json, Value};

use crate::lycoris::{self, LycorisConfig};
use crate::peft_json;

/// A LoHa adapter's configuration, with PEFT's field names.
#[derive(Debug, Clone, PartialEq)]
pub struct LohaConfig {
    /// r, alpha, dropout, targeting and patterns, as LoKr has them.
    pub lycoris: LycorisConfig,
    /// Start with ΔW = 0 (W2b zero), else every factor kaiming-uniform.
    pub init_weights: bool,
}

impl Default for LohaConfig {
    fn default() -> Self {
        Self {
            lycoris: LycorisConfig::default(),
            init_weights: true,
        }
    }
}

impl LohaConfig {
    /// Parses PEFT's JSON, refusing options peft-rs does not implement.
    pub fn from_json(json: &Value) -> Result<Self> {
        let obj = peft_json::object(json, lycoris::FIELDS, "LoHaConfig")?;
        Ok(Self {
            lycoris: LycorisConfig::from_json(obj)?,
            init_weights: peft_json::boolean(obj, "init_weights", true)?,
        })
    }

    /// The `adapter_config.json` PEFT writes for this configuration.
    pub fn to_json(&self) -> Value {
        let mut m = self.lycoris.to_json("LOHA");
        m.insert("init_weights".into(), json!(self.init_weights));
        Value::Object(m)
    }
}
