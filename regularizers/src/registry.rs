//! Regularizers chosen by name, from flags (`--regularizer
//! neftune:alpha=5,mode=hf`) and settings files (`[[regularizers]]` with
//! `kind = "neftune"`, `alpha = 5`). A [`Registry`] maps each name to a
//! factory and the keys it takes; [`Registry::builtin`] holds those of this
//! crate, and a program built on peft-rs registers its own next to them,
//! which its flags and settings files can then name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{HiddenNoise, Neftune, NeftuneMode, NoiseDistribution, Regularizer};

/// A regularizer as settings name it: its kind and its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegularizerSpec {
    /// The registered name (`neftune`, `hidden_noise`, ...).
    pub kind: String,
    /// Its parameters, by key.
    #[serde(flatten)]
    pub params: BTreeMap<String, Value>,
}

impl FromStr for RegularizerSpec {
    type Err = anyhow::Error;

    /// `NAME` or `NAME:KEY=VALUE,KEY=VALUE`; values read as JSON numbers or
    /// booleans where they are, as text otherwise.
    fn from_str(s: &str) -> Result<Self> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        if kind.trim().is_empty() {
            bail!("`{s}`: expected NAME[:KEY=VALUE,...]");
        }
        let mut params = BTreeMap::new();
        for pair in rest.split(',').filter(|p| !p.trim().is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                bail!("`{s}`: `{pair}` is not KEY=VALUE");
            };
            let v = v.trim();
            let value = match serde_json::from_str::<Value>(v) {
                Ok(n @ (Value::Number(_) | Value::Bool(_))) => n,
                _ => Value::String(v.to_owned()),
            };
            if params.insert(k.trim().to_owned(), value).is_some() {
                bail!("`{s}`: `{}` is given twice", k.trim());
            }
        }
        Ok(Self {
            kind: kind.trim().to_owned(),
            params,
        })
    }
}

impl fmt::Display for RegularizerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.kind)?;
        for (i, (k, v)) in self.params.iter().enumerate() {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            write!(f, "{}{k}={v}", if i == 0 { ':' } else { ',' })?;
        }
        Ok(())
    }
}

/// The parameters of one regularizer, read by its factory: each getter
/// checks the value's type and names the key when it is wrong.
pub struct Params<'a> {
    kind: &'a str,
    values: &'a BTreeMap<String, Value>,
}

impl Params<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    fn wrong(&self, key: &str, v: &Value, what: &str) -> anyhow::Error {
        anyhow::anyhow!("regularizer {}: `{key}` = {v} must be {what}", self.kind)
    }

    /// A finite number; `default` when absent (`None`: required).
    pub fn number(&self, key: &str, default: Option<f64>) -> Result<f64> {
        match self.get(key) {
            None => {
                default.with_context(|| format!("regularizer {}: `{key}` is required", self.kind))
            }
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.wrong(key, v, "a finite number")),
        }
    }

    /// A required finite number that is at least 0 (a scale, a deviation).
    pub fn non_negative(&self, key: &str) -> Result<f64> {
        let x = self.number(key, None)?;
        if x < 0.0 {
            bail!("regularizer {}: `{key}` = {x} must be >= 0", self.kind);
        }
        Ok(x)
    }

    /// A list of non-negative integers, given as one (`3`) or as several
    /// joined by `+` (`2+5`, since `,` separates keys on the command line)
    /// or as a list in a settings file.
    pub fn indices(&self, key: &str) -> Result<Vec<usize>> {
        let Some(v) = self.get(key) else {
            bail!("regularizer {}: `{key}` is required", self.kind);
        };
        let one = |x: &Value| x.as_u64().map(|n| n as usize);
        let list = match v {
            Value::Array(a) => a.iter().map(one).collect::<Option<Vec<_>>>(),
            Value::String(s) => s.split('+').map(|p| p.trim().parse().ok()).collect(),
            x => one(x).map(|n| vec![n]),
        };
        list.filter(|l| !l.is_empty())
            .ok_or_else(|| self.wrong(key, v, "a layer index or indices joined by +"))
    }

    /// A value parsed from text (an enum's name, say); `default` when absent.
    pub fn parse<T: FromStr<Err = anyhow::Error>>(&self, key: &str, default: T) -> Result<T> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::String(s)) => s.parse().map_err(|e: anyhow::Error| {
                anyhow::anyhow!("regularizer {}: `{key}`: {e}", self.kind)
            }),
            Some(v) => Err(self.wrong(key, v, "a name")),
        }
    }
}

/// Makes a regularizer from its parameters.
pub type Factory = Box<dyn Fn(&Params) -> Result<Box<dyn Regularizer>> + Send + Sync>;

struct Entry {
    about: String,
    keys: Vec<(String, String)>,
    factory: Factory,
}

/// The regularizers a program knows, by name.
#[derive(Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl Registry {
    /// A registry with nothing in it.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The regularizers of this crate: `neftune` and `hidden_noise`.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.register(
            "neftune",
            "noise on the token embeddings in training (Jain et al. 2023)",
            &[
                ("alpha", "α, the noise scale (0 is off)"),
                ("mode", "paper (each example's length, no noise on padding) or hf (padded length, as TRL)"),
                ("noise", "uniform (the paper) or gaussian (its ablation)"),
            ],
            |p| {
                Ok(Box::new(Neftune {
                    alpha: p.non_negative("alpha")?,
                    mode: p.parse("mode", NeftuneMode::Paper)?,
                    noise: p.parse("noise", NoiseDistribution::Uniform)?,
                }))
            },
        );
        r.register(
            "hidden_noise",
            "Gaussian noise on decoder layers' outputs in training",
            &[
                (
                    "layer",
                    "the layer index, or indices joined by + (model.layers.N)",
                ),
                ("std", "the noise's standard deviation"),
            ],
            |p| {
                Ok(Box::new(HiddenNoise {
                    layers: p.indices("layer")?,
                    std: p.non_negative("std")?,
                }))
            },
        );
        r
    }

    /// Registers `name` (replacing one of that name): what it does, its
    /// keys with a line each, and the factory that makes it.
    pub fn register(
        &mut self,
        name: &str,
        about: &str,
        keys: &[(&str, &str)],
        factory: impl Fn(&Params) -> Result<Box<dyn Regularizer>> + Send + Sync + 'static,
    ) {
        self.entries.insert(
            name.to_owned(),
            Entry {
                about: about.to_owned(),
                keys: keys
                    .iter()
                    .map(|(k, d)| ((*k).to_owned(), (*d).to_owned()))
                    .collect(),
                factory: Box::new(factory),
            },
        );
    }

    /// The names it knows, in order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// One line per regularizer: name, keys and what it does.
    pub fn describe(&self) -> String {
        self.entries
            .iter()
            .map(|(n, e)| {
                let keys: Vec<&str> = e.keys.iter().map(|(k, _)| k.as_str()).collect();
                format!("{n} ({}): {}", keys.join(", "), e.about)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Makes the regularizer `spec` names. An unknown name lists the known
    /// ones; an unknown key lists the keys the regularizer takes.
    pub fn build(&self, spec: &RegularizerSpec) -> Result<Box<dyn Regularizer>> {
        let Some(entry) = self.entries.get(&spec.kind) else {
            bail!(
                "unknown regularizer `{}`; known: {}",
                spec.kind,
                self.describe()
            );
        };
        let declared: BTreeSet<&str> = entry.keys.iter().map(|(k, _)| k.as_str()).collect();
        if let Some(k) = spec.params.keys().find(|k| !declared.contains(k.as_str())) {
            let keys: Vec<String> = entry
                .keys
                .iter()
                .map(|(k, d)| format!("{k} ({d})"))
                .collect();
            bail!(
                "regularizer {}: unknown key `{k}`; it takes {}",
                spec.kind,
                keys.join(", ")
            );
        }
        let params = Params {
            kind: &spec.kind,
            values: &spec.params,
        };
        (entry.factory)(&params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(r: &Registry, spec: &str) -> String {
        match r.build(&spec.parse().unwrap()) {
            Ok(built) => panic!("{spec} built {}", built.name()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn specs_read_from_flags_and_build_by_name() {
        let spec: RegularizerSpec = "neftune:alpha=5,mode=hf".parse().unwrap();
        assert_eq!(spec.kind, "neftune");
        assert_eq!(spec.params["alpha"], serde_json::json!(5));
        assert_eq!(spec.to_string(), "neftune:alpha=5,mode=hf");
        let r = Registry::builtin();
        assert_eq!(
            r.build(&spec).unwrap().name(),
            "neftune(alpha=5, mode=hf, noise=uniform)"
        );
        let h: RegularizerSpec = "hidden_noise:layer=0+1,std=0.01".parse().unwrap();
        assert_eq!(
            r.build(&h).unwrap().name(),
            "hidden_noise(layers=0+1, std=0.01)"
        );
        // Unknown names and keys list what exists.
        let e = failure(&r, "dropout:p=1");
        assert!(
            e.contains("unknown regularizer `dropout`") && e.contains("hidden_noise (layer, std)"),
            "{e}"
        );
        let e = failure(&r, "neftune:alpha=5,sigma=2");
        assert!(
            e.contains("unknown key `sigma`") && e.contains("mode ("),
            "{e}"
        );
        let e = failure(&r, "neftune:alpha=x");
        assert!(e.contains("`alpha` = \"x\" must be a finite number"), "{e}");
        let e = failure(&r, "neftune:mode=paper");
        assert!(e.contains("`alpha` is required"), "{e}");
        let e = failure(&r, "neftune:alpha=5,mode=gpt");
        assert!(e.contains("expected paper or hf"), "{e}");
        assert!("neftune:alpha".parse::<RegularizerSpec>().is_err());
        assert!(":alpha=1".parse::<RegularizerSpec>().is_err());
        assert!("neftune:alpha=1,alpha=2"
            .parse::<RegularizerSpec>()
            .is_err());
    }

    #[test]
    fn specs_from_settings_files_keep_their_types() {
        let spec: RegularizerSpec = serde_json::from_value(
            serde_json::json!({"kind": "hidden_noise", "layer": [1, 2], "std": 0.5}),
        )
        .unwrap();
        let built = Registry::builtin().build(&spec).unwrap();
        assert_eq!(built.name(), "hidden_noise(layers=1+2, std=0.5)");
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::json!({"kind": "hidden_noise", "layer": [1, 2], "std": 0.5})
        );
    }
}
