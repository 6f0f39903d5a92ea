//! The parts of PEFT's `adapter_config.json` every method shares: reading
//! the file, the fields that must be off, and the typed fields' parsers,
//! each error naming its field.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::lora::targets::{parse_targets, TargetModules};

/// `DIR/adapter_config.json` as JSON (a regular file of bounded size).
pub fn read(dir: &Path) -> Result<(std::path::PathBuf, Value)> {
    let path = dir.join(crate::lora::files::CONFIG_FILE);
    let text = crate::fsio::read_regular_string(
        &path,
        crate::fsio::MAX_JSON_BYTES,
        "adapter config (a PEFT adapter directory has adapter_config.json)",
    )?;
    let json = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    Ok((path, json))
}

/// Fields every PEFT config has, read or checked by [`object`] or only
/// recording where the adapter came from.
pub const COMMON_FIELDS: &[&str] = &[
    "peft_type",
    "task_type",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "base_model_name_or_path",
    "inference_mode",
    "revision",
    "auto_mapping",
    "peft_version",
];

/// Whether a field holds its "off" value (null, false, empty).
pub fn is_off(v: &Value) -> bool {
    v.is_null() || v == &json!(false) || v == &json!({}) || v == &json!([])
}

/// The JSON object, checked for what every method refuses: another
/// `task_type` than CAUSAL_LM, a field outside `known` and
/// [`COMMON_FIELDS`] that is not off
/// (`config_class` names the PEFT class in the error), GPT-2's
/// `fan_in_fan_out`, and `modules_to_save`.
pub fn object<'a>(
    json: &'a Value,
    known: &[&str],
    config_class: &str,
) -> Result<&'a Map<String, Value>> {
    let Some(obj) = json.as_object() else {
        bail!("expected a JSON object");
    };
    if let Some(t) = obj.get("task_type").and_then(Value::as_str) {
        if t != "CAUSAL_LM" {
            bail!("`task_type` is `{t}`; peft-rs adapts causal language models (CAUSAL_LM)");
        }
    }
    if let Some((k, v)) = obj.iter().find(|(k, v)| {
        let k = k.as_str();
        !(known.contains(&k) || COMMON_FIELDS.contains(&k) || is_off(v))
    }) {
        bail!("`{k}` = {v} is a PEFT {config_class} option peft-rs does not support");
    }
    if obj.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        bail!("`fan_in_fan_out` = true is for GPT-2-style Conv1D layers, which Llama-family models do not have");
    }
    if obj.get("modules_to_save").is_some_and(|v| !is_off(v)) {
        bail!("`modules_to_save` is not supported (only adapter weights are trained and loaded)");
    }
    Ok(obj)
}

/// A `target_modules`-style field, `None` when absent or null.
pub fn targets(obj: &Map<String, Value>, k: &str) -> Result<Option<TargetModules>> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_targets(v, k).map(Some),
    }
}

/// `layers_to_transform`: an index or a list of indices, `None` when absent.
pub fn layers(obj: &Map<String, Value>) -> Result<Option<Vec<usize>>> {
    Ok(match obj.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(vec![n
            .as_u64()
            .context("`layers_to_transform` must be >= 0")?
            as usize]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .context("`layers_to_transform` must list layer indices")?,
        ),
        Some(v) => bail!("`layers_to_transform` must be an index or a list, found {v}"),
    })
}

/// A boolean field, `default` when absent or null.
pub fn boolean(obj: &Map<String, Value>, k: &str, default: bool) -> Result<bool> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .with_context(|| format!("`{k}` must be true or false, found {v}")),
    }
}

/// A number field, `default` when absent or null.
pub fn number(obj: &Map<String, Value>, k: &str, default: f64) -> Result<f64> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .with_context(|| format!("`{k}` must be a number, found {v}")),
    }
}

/// The rank field `r`, `default` when absent.
pub fn rank(obj: &Map<String, Value>, default: usize) -> Result<usize> {
    match obj.get("r") {
        None => Ok(default),
        Some(v) => Ok(v
            .as_u64()
            .with_context(|| format!("`r` must be a positive integer, found {v}"))?
            as usize),
    }
}

/// `base_model_name_or_path`, when a string.
pub fn base_model(obj: &Map<String, Value>) -> Option<String> {
    obj.get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(str::to_owned)
}
