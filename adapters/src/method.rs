//! An adapter directory's method, chosen by the `peft_type` of its
//! `adapter_config.json`, with that method's configuration.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::ia3::Ia3Config;
use crate::lora::LoraConfig;

/// The configuration of an adapter of any method peft-rs implements.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterConfig {
    /// `peft_type` LORA (with rsLoRA, DoRA, PiSSA/OLoRA starts).
    Lora(LoraConfig),
    /// `peft_type` IA3.
    Ia3(Ia3Config),
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
        let path = dir.join(crate::lora::files::CONFIG_FILE);
        let text = crate::fsio::read_regular_string(
            &path,
            crate::fsio::MAX_JSON_BYTES,
            "adapter config (a PEFT adapter directory has adapter_config.json)",
        )?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&json).with_context(|| path.display().to_string())
    }

    /// Parses PEFT's JSON for the method its `peft_type` names.
    pub fn from_json(json: &Value) -> Result<Self> {
        match json.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => Ok(Self::Lora(LoraConfig::from_json(json)?)),
            Some("IA3") => Ok(Self::Ia3(Ia3Config::from_json(json)?)),
            Some(other) => bail!(
                "`peft_type` is `{other}`; peft-rs reads LORA and IA3 adapters (VeRA, LoHa, LoKr and the others are not implemented)"
            ),
            None => bail!("`peft_type` missing (PEFT writes \"LORA\", \"IA3\", ...)"),
        }
    }

    /// The `adapter_config.json` PEFT writes for this configuration.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Lora(c) => c.to_json(),
            Self::Ia3(c) => c.to_json(),
        }
    }

    /// The method's name, for messages.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Lora(_) => "LoRA",
            Self::Ia3(_) => "IA³",
        }
    }

    /// Which of `linear_paths` the adapter adapts.
    pub fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>> {
        match self {
            Self::Lora(c) => c
                .validate()
                .and_then(|()| c.select(linear_paths, output_head)),
            Self::Ia3(c) => c.select(linear_paths, output_head),
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
        }
    }
}
