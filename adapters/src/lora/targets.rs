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

/// A `target_modules`-style field of PEFT's JSON (`field` names it in errors).
pub fn parse_targets(v: &Value, field: &str) -> Result<TargetModules> {
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
pub fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Option<T> {
    patterns.iter().find_map(|(p, &v)| {
        Regex::new(&format!(r"^(.*\.)?({p})$"))
            .ok()
            .filter(|re| re.is_match(path))
            .map(|_| v)
    })
}

/// Which of `linear_paths` get an adapter: those `target` matches, minus
/// those `exclude` matches, in `layers` when given. Stricter than PEFT:
/// every listed target name must match at least one module, so a typo in one
/// of several names is an error that lists the model's linear modules.
pub fn select_modules<'a>(
    target: &TargetModules,
    exclude: Option<&TargetModules>,
    layers: Option<&[usize]>,
    linear_paths: &[&'a str],
    output_head: &str,
) -> Result<Vec<&'a str>> {
    let layer_of = Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("valid regex");
    let in_layers = |p: &str| match layers {
        None => true,
        Some(ls) => layer_of
            .captures(p)
            .and_then(|c| c[1].parse::<usize>().ok())
            .is_some_and(|i| ls.contains(&i)),
    };
    let excluded = |p: &str| exclude.is_some_and(|e| matches(e, p, output_head));
    let chosen: Vec<&str> = linear_paths
        .iter()
        .copied()
        .filter(|p| matches(target, p, output_head) && !excluded(p) && in_layers(p))
        .collect();
    if let TargetModules::Names(list) = target {
        for n in list {
            if !linear_paths.iter().any(|p| suffix_match(n, p)) {
                bail!(
                    "target module `{n}` matches no linear layer of this model (its linear modules: {})",
                    short_names(linear_paths)
                );
            }
        }
    }
    if chosen.is_empty() {
        bail!(
            "`target_modules` {target:?} selects no linear layer of this model (its linear modules: {})",
            short_names(linear_paths)
        );
    }
    Ok(chosen)
}

/// The distinct last components of `paths`, sorted, for error messages.
pub fn short_names(paths: &[&str]) -> String {
    let mut short: Vec<&str> = paths
        .iter()
        .map(|p| p.rsplit('.').next().unwrap_or(p))
        .collect();
    short.sort();
    short.dedup();
    short.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_modules_read_as_flags_and_as_peft_writes_them() {
        let flag: TargetModules = "q_proj, v_proj".parse().unwrap();
        assert_eq!(
            flag,
            TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(flag.to_string(), "q_proj,v_proj");
        assert_eq!(
            "all-linear".parse::<TargetModules>().unwrap(),
            TargetModules::AllLinear
        );
        assert!("q_proj,,v_proj".parse::<TargetModules>().is_err());
        // PEFT's three JSON forms, and the list older settings wrote.
        let read = |v: Value| serde_json::from_value::<TargetModules>(v).unwrap();
        assert_eq!(read(json!("all-linear")), TargetModules::AllLinear);
        assert_eq!(read(json!(["all-linear"])), TargetModules::AllLinear);
        assert_eq!(
            read(json!(".*q_proj")),
            TargetModules::Regex(".*q_proj".into())
        );
        assert_eq!(
            read(json!(["o_proj"])),
            TargetModules::Names(vec!["o_proj".into()])
        );
        assert!(serde_json::from_value::<TargetModules>(json!(3)).is_err());
        for t in [read(json!("all-linear")), read(json!(["o_proj"]))] {
            assert_eq!(read(serde_json::to_value(&t).unwrap()), t);
        }
    }

    #[test]
    fn names_match_by_suffix_regexes_whole_paths_and_all_linear_spares_the_head() {
        let path = "model.layers.0.self_attn.q_proj";
        assert!(matches(
            &TargetModules::Names(vec!["q_proj".into()]),
            path,
            "lm_head"
        ));
        assert!(!matches(
            &TargetModules::Names(vec!["_proj".into()]),
            path,
            "lm_head"
        ));
        assert!(matches(
            &TargetModules::Regex(r".*\.q_proj".into()),
            path,
            "lm_head"
        ));
        assert!(!matches(
            &TargetModules::Regex("q_proj".into()),
            path,
            "lm_head"
        ));
        assert!(matches(&TargetModules::AllLinear, path, "lm_head"));
        assert!(!matches(&TargetModules::AllLinear, "lm_head", "lm_head"));
        let patterns: BTreeMap<String, usize> = [("q_proj".to_owned(), 4)].into();
        assert_eq!(pattern_value(&patterns, path), Some(4));
        assert_eq!(
            pattern_value(&patterns, "model.layers.0.self_attn.v_proj"),
            None
        );
    }
}
