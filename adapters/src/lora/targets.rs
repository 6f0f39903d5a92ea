//! `target_modules` (and `exclude_modules`): which linear layers get an
//! adapter, in PEFT's three forms and with its matching rules.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Value};

/// Which linear layers get an adapter (PEFT's `target_modules`).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names; a module matches when its path equals a name or ends with `.name`.
    Names(Vec<String>),
    /// A regular expression that must match the whole module path.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

impl FromStr for TargetModules {
    type Err = anyhow::Error;

    /// `all-linear`, or a comma-separated list of module names (a flag's form).
    fn from_str(s: &str) -> Result<Self> {
        if s.trim() == "all-linear" {
            return Ok(Self::AllLinear);
        }
        let names: Vec<String> = s.split(',').map(|n| n.trim().to_owned()).collect();
        if names.iter().any(String::is_empty) {
            bail!("`{s}`: expected all-linear or module names separated by commas");
        }
        Ok(Self::Names(names))
    }
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AllLinear => f.write_str("all-linear"),
            Self::Names(n) => f.write_str(&n.join(",")),
            Self::Regex(r) => f.write_str(r),
        }
    }
}

impl TargetModules {
    /// PEFT's JSON form: "all-linear", a regex string, or a list of names.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Names(n) => json!(n),
            Self::Regex(r) => json!(r),
            Self::AllLinear => json!("all-linear"),
        }
    }
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    /// PEFT's forms, and a list holding only "all-linear" (older settings).
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        if v == json!(["all-linear"]) {
            return Ok(Self::AllLinear);
        }
        parse_targets(&v, "target_modules").map_err(serde::de::Error::custom)
    }
}

pub(crate) fn parse_targets(v: &Value, field: &str) -> Result<TargetModules> {
    Ok(match v {
        Value::String(s) if s == "all-linear" => TargetModules::AllLinear,
        Value::String(s) => TargetModules::Regex(s.clone()),
        Value::Array(a) => TargetModules::Names(
            a.iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("`{field}` must list module names"))?,
        ),
        other => {
            bail!("`{field}` must be a list of names, a regex or \"all-linear\", found {other}")
        }
    })
}

pub(crate) fn suffix_match(name: &str, path: &str) -> bool {
    path == name || path.ends_with(&format!(".{name}"))
}

pub(crate) fn matches(t: &TargetModules, path: &str, output_head: &str) -> bool {
    match t {
        TargetModules::AllLinear => path != output_head,
        TargetModules::Names(names) => names.iter().any(|n| suffix_match(n, path)),
        TargetModules::Regex(r) => {
            Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(path))
        }
    }
}

/// PEFT's `get_pattern_key`: the first pattern `p` with `(.*\.)?(p)$` matching.
pub(crate) fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Option<T> {
    patterns.iter().find_map(|(p, &v)| {
        Regex::new(&format!(r"^(.*\.)?({p})$"))
            .ok()
            .filter(|re| re.is_match(path))
            .map(|_| v)
    })
}
