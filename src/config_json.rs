//! Reading `config.json` with errors that name the file and the field: the
//! leaf the models and the quantization settings both read through.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A parsed `config.json` with field accessors that report the file and field.
pub struct RawConfig {
    /// Where it was read from.
    pub path: PathBuf,
    /// The JSON object.
    pub json: serde_json::Map<String, Value>,
}

impl RawConfig {
    /// Reads `DIR/config.json`.
    pub fn read(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("config.json");
        if !model_dir.is_dir() {
            bail!(
                "{}: model directory not found (pass a Hugging Face model directory with --model)",
                model_dir.display()
            );
        }
        let text = peft_adapters::fsio::read_regular_string(
            &path,
            peft_adapters::fsio::MAX_JSON_BYTES,
            "model config (a Hugging Face model directory has a config.json)",
        )?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let Value::Object(json) = json else {
            bail!("{}: expected a JSON object", path.display());
        };
        Ok(Self { path, json })
    }

    /// `model_type`, e.g. `llama`.
    pub fn model_type(&self) -> Result<&str> {
        self.json
            .get("model_type")
            .and_then(Value::as_str)
            .with_context(|| format!("{}: field `model_type` missing", self.path.display()))
    }

    /// A required positive integer.
    pub fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .with_context(|| format!("{}: field `{field}` missing", self.path.display()))
    }

    /// An optional non-negative integer (absent or null gives `None`).
    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        self.opt(field, "a non-negative integer", |v| {
            v.as_u64().map(|x| x as usize)
        })
    }

    /// An optional number.
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        self.opt(field, "a number", Value::as_f64)
    }

    /// An optional boolean.
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        self.opt(field, "true or false", Value::as_bool)
    }

    /// An optional string.
    pub fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        self.opt(field, "a string", Value::as_str)
    }

    /// An optional value of `field` read by `get` (absent or null gives
    /// `None`); a value `get` cannot read is an error saying it must be `what`.
    fn opt<'a, T>(
        &'a self,
        field: &str,
        what: &str,
        get: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.json.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => get(v).map(Some).with_context(|| {
                format!(
                    "{}: field `{field}` must be {what}, found {v}",
                    self.path.display()
                )
            }),
        }
    }

    /// Fails with a message naming the field when `ok` is false.
    pub fn ensure(&self, ok: bool, field: &str, why: &str) -> Result<()> {
        if !ok {
            bail!("{}: field `{field}`: {why}", self.path.display());
        }
        Ok(())
    }

    /// The token ids listed in `field` (an integer or a list of integers;
    /// absent or null: none). Anything else is an error naming the field.
    pub fn token_ids(&self, field: &str) -> Result<Vec<i64>> {
        token_ids_of(self.json.get(field))
            .with_context(|| format!("{}: field `{field}`", self.path.display()))
    }

    /// An optional number `key` of the object `obj` (`rope_parameters`, say,
    /// named `field` in errors): absent or null gives `None`; a value of
    /// another type (a string "0.5") is an error, as in transformers, never
    /// silently replaced by the default.
    pub fn number_in(&self, obj: Option<&Value>, field: &str, key: &str) -> Result<Option<f64>> {
        match obj.and_then(|o| o.get(key)) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => bail!(
                    "{}: field `{field}.{key}` must be a number, found {v}",
                    self.path.display()
                ),
            },
        }
    }

    /// An optional string `key` of the object `obj`, as [`RawConfig::number_in`].
    pub fn str_in<'a>(
        &self,
        obj: Option<&'a Value>,
        field: &str,
        key: &str,
    ) -> Result<Option<&'a str>> {
        match obj.and_then(|o| o.get(key)) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_str().map(Some).with_context(|| {
                format!(
                    "{}: field `{field}.{key}` must be a string, found {v}",
                    self.path.display()
                )
            }),
        }
    }
}

/// Token ids given as an integer or a list of integers (absent or null:
/// none); anything else is an error.
pub fn token_ids_of(v: Option<&Value>) -> Result<Vec<i64>> {
    let id = |v: &Value| {
        v.as_i64()
            .filter(|&i| i >= 0)
            .with_context(|| format!("must be a token id or a list of token ids, found {v}"))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(id).collect(),
        Some(v) => Ok(vec![id(v)?]),
    }
}
