//! `LoKrConfig`: PEFT's field names and meanings, read from and written to
//! `adapter_config.json`, and how a layer's shape is factored.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::lycoris::{self, LycorisConfig};
use crate::peft_json;

/// A LoKr adapter's configuration, with PEFT's field names.
#[derive(Debug, Clone, PartialEq)]
pub struct LokrConfig {
    /// r, alpha, dropout, targeting and patterns, as LoHa has them.
    pub lycoris: LycorisConfig,
    /// How the factors start.
    pub init_weights: InitWeights,
    /// Also write the left factor W1 as a low-rank product when r is small
    /// against its size.
    pub decompose_both: bool,
    /// The size of the left factor W1 along each dimension when it divides
    /// the dimension; -1: near the square root.
    pub decompose_factor: i64,
    /// Rescale the rows kept by rank dropout by the share kept.
    pub rank_dropout_scale: bool,
}

impl Default for LokrConfig {
    /// PEFT's defaults.
    fn default() -> Self {
        Self {
            lycoris: LycorisConfig::default(),
            init_weights: InitWeights::True,
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
        }
    }
}

/// `init_weights` of LoKr (LoHa takes the first two): PEFT's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitWeights {
    /// `true`: W1 (or W1's left factor) zero, so ΔW = 0; the rest random.
    #[default]
    True,
    /// `false`: every factor random (ΔW ≠ 0 at the start).
    False,
    /// `"lycoris"`: as the LyCORIS repository, W2 (or W2's right factor)
    /// zero, the rest random.
    Lycoris,
}

impl InitWeights {
    /// The JSON value PEFT writes.
    pub fn to_json(self) -> Value {
        match self {
            Self::True => json!(true),
            Self::False => json!(false),
            Self::Lycoris => json!("lycoris"),
        }
    }

    fn from_json(v: Option<&Value>) -> Result<Self> {
        match v {
            None | Some(Value::Null) | Some(Value::Bool(true)) => Ok(Self::True),
            Some(Value::Bool(false)) => Ok(Self::False),
            Some(Value::String(s)) if s == "lycoris" => Ok(Self::Lycoris),
            Some(v) => bail!("`init_weights` must be true, false or \"lycoris\", found {v}"),
        }
    }
}

impl fmt::Display for InitWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::True => "true",
            Self::False => "false",
            Self::Lycoris => "lycoris",
        })
    }
}

impl FromStr for InitWeights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" => Ok(Self::True),
            "false" => Ok(Self::False),
            "lycoris" => Ok(Self::Lycoris),
            _ => Err(format!("expected true, false or lycoris, found `{s}`")),
        }
    }
}

impl Serialize for InitWeights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for InitWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_json(Some(&v)).map_err(serde::de::Error::custom)
    }
}

/// LoKr's own fields, beyond [`lycoris::FIELDS`].
const OWN_FIELDS: &[&str] = &["decompose_both", "decompose_factor", "rank_dropout_scale"];

/// How LoKr factors one layer `[out, in]`: out = a·b and in = c·d, W1
/// `[a, c]` and W2 `[b, d]`, each whole or a product through rank `r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The rank of the low-rank products.
    pub r: i64,
    /// (a, b): out = a·b.
    pub out: (i64, i64),
    /// (c, d): in = c·d.
    pub inp: (i64, i64),
    /// W1 whole (`lokr_w1`) rather than `lokr_w1_a @ lokr_w1_b`.
    pub use_w1: bool,
    /// W2 whole (`lokr_w2`) rather than `lokr_w2_a @ lokr_w2_b`.
    pub use_w2: bool,
}

impl Layout {
    /// The tensors of this layout: their names in PEFT's files and shapes,
    /// W1's before W2's.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (r, (a, b), (c, d)) = (self.r, self.out, self.inp);
        let mut v = Vec::new();
        let mut factor = |name: &str, whole: bool, rows: i64, cols: i64| {
            if whole {
                v.push((name.to_owned(), vec![rows, cols]));
            } else {
                v.push((format!("{name}_a"), vec![rows, r]));
                v.push((format!("{name}_b"), vec![r, cols]));
            }
        };
        factor("lokr_w1", self.use_w1, a, c);
        factor("lokr_w2", self.use_w2, b, d);
        v
    }
}

/// Splits `dimension` into m·n with m ≤ n, as PEFT's (and LyCORIS')
/// `factorization`: m = `factor` when it divides the dimension, else the
/// divisors are walked up towards the square root, none beyond `factor`
/// (-1: no bound).
pub fn factorization(dimension: i64, factor: i64) -> (i64, i64) {
    if factor > 0 && dimension % factor == 0 {
        return (factor, dimension / factor);
    }
    let bound = if factor == -1 { dimension } else { factor };
    let (mut m, mut n) = (1, dimension);
    // PEFT compares each new pair's sum with the first pair's, 1 + dimension.
    let first_sum = m + n;
    while m < n {
        let mut next_m = m + 1;
        while dimension % next_m != 0 {
            next_m += 1;
        }
        let next_n = dimension / next_m;
        if next_m + next_n > first_sum || next_m > bound {
            break;
        }
        (m, n) = (next_m, next_n);
    }
    (m.min(n), m.max(n))
}

impl LokrConfig {
    /// Parses PEFT's JSON, refusing options peft-rs does not implement.
    pub fn from_json(json: &Value) -> Result<Self> {
        let known: Vec<&str> = lycoris::FIELDS.iter().chain(OWN_FIELDS).copied().collect();
        let obj = peft_json::object(json, &known, "LoKrConfig")?;
        let factor = match obj.get("decompose_factor") {
            None | Some(Value::Null) => -1,
            Some(v) => v.as_i64().ok_or_else(|| {
                anyhow::anyhow!(
                    "`decompose_factor` must be an integer (-1: near the square root), found {v}"
                )
            })?,
        };
        Ok(Self {
            lycoris: LycorisConfig::from_json(obj)?,
            init_weights: InitWeights::from_json(obj.get("init_weights"))?,
            decompose_both: peft_json::boolean(obj, "decompose_both", false)?,
            decompose_factor: factor,
            rank_dropout_scale: peft_json::boolean(obj, "rank_dropout_scale", false)?,
        })
    }

    /// The `adapter_config.json` PEFT writes for this configuration.
    pub fn to_json(&self) -> Value {
        let mut m = self.lycoris.to_json("LOKR");
        m.insert("init_weights".into(), self.init_weights.to_json());
        m.insert("decompose_both".into(), json!(self.decompose_both));
        m.insert("decompose_factor".into(), json!(self.decompose_factor));
        m.insert("rank_dropout_scale".into(), json!(self.rank_dropout_scale));
        Value::Object(m)
    }

    /// How module `path`, `[out_f, in_f]`, is factored (PEFT's
    /// `update_layer` for `nn.Linear`): W2 is a product when r is below half
    /// of its larger side, W1 likewise with `decompose_both`.
    pub fn layout(&self, path: &str, in_f: i64, out_f: i64) -> Layout {
        let (r, _) = self.lycoris.rank_and_scaling(path);
        let (c, d) = factorization(in_f, self.decompose_factor);
        let (a, b) = factorization(out_f, self.decompose_factor);
        let below_half = |x: i64, y: i64| (r as f64) < x.max(y) as f64 / 2.0;
        Layout {
            r,
            out: (a, b),
            inp: (c, d),
            use_w1: !(self.decompose_both && below_half(a, c)),
            use_w2: !below_half(b, d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of PEFT's docstring, and the bound on the first factor.
    #[test]
    fn factorization_splits_as_peft() {
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(96, 5), (4, 24));
        for dim in 1..300 {
            let (m, n) = factorization(dim, -1);
            assert!(m * n == dim && m <= n, "{dim}: {m}×{n}");
        }
    }

    #[test]
    fn init_weights_round_trips_through_json_and_flags() {
        for w in [InitWeights::True, InitWeights::False, InitWeights::Lycoris] {
            assert_eq!(InitWeights::from_json(Some(&w.to_json())).unwrap(), w);
            assert_eq!(w.to_string().parse::<InitWeights>().unwrap(), w);
        }
        assert!(InitWeights::from_json(Some(&json!("gaussian"))).is_err());
    }
}
