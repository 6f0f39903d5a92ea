//! `LoraConfig`: PEFT's field names and meanings, read from and written to
//! `adapter_config.json` ([`LoraConfig::from_json`], [`LoraConfig::to_json`]).
//!
//! The same struct is the adapter part of a training run's settings: its
//! serde form (`lora_rank`, `lora_alpha`, `lora_dropout`, `target_modules`,
//! `use_rslora`, `use_dora`, `init_lora_weights` and the pattern fields, the
//! names TRL users write) is what `training_args.json` and settings files hold,
//! flattened into the run's settings, and its clap form the `--lora-*` flags.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use clap::ArgAction;
use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

use super::targets::TargetModules;
use super::targets::{pattern_value, select_modules};
use crate::peft_json;

/// How new adapter weights start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitLoraWeights {
    /// `true`: A ~ kaiming-uniform(a=√5) = U(-1/√in, 1/√in), B = 0.
    Default,
    /// `"gaussian"`: A ~ N(0, 1/r), B = 0.
    Gaussian,
    /// `false`: A and B both as `nn.Linear`'s default; the adapter is not a no-op.
    Random,
    /// `"pissa"` (`niter: None`: the exact SVD) or `"pissa_niter_N"` (the
    /// randomized SVD with N subspace iterations): A and B from the `r`
    /// principal singular triplets of W, and the base becomes the residual
    /// W − scaling·BA.
    Pissa {
        /// Subspace iterations of the randomized SVD.
        niter: Option<u32>,
    },
    /// `"olora"`: B and A from W's QR factorisation (Q's and R's first r
    /// columns and rows); the base becomes W − scaling·BA.
    Olora,
    /// `"loftq"` with `loftq_config` {`loftq_bits`: 4, `loftq_iter`}: the
    /// base becomes Q, W's NF4 quantization (dequantized), and B, A the
    /// rank-r SVD factors of W − Q, alternated `iters` times (LoftQ, Li et
    /// al. 2023), so that Q + BA approximates W better than Q alone.
    Loftq {
        /// Alternations of quantizing and the SVD (PEFT's `loftq_iter`).
        iters: u32,
    },
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_json(Some(&v)).map_err(serde::de::Error::custom)
    }
}

/// Initialisations PEFT has that peft-rs does not, with why.
const UNSUPPORTED_INITS: &[(&str, &str)] = &[
    (
        "eva",
        "EVA needs activations from a data pass before training and is not implemented",
    ),
    (
        "corda",
        "CorDA needs covariance statistics from a data pass and is not implemented",
    ),
    (
        "lora_ga",
        "LoRA-GA needs gradients from a data pass and is not implemented",
    ),
    (
        "orthogonal",
        "the orthogonal initialisation is not implemented",
    ),
    ("mica", "MiCA is not implemented"),
];

const EXPECTED_INITS: &str = "true, false, gaussian, pissa, pissa_niter_N, olora or loftq";

impl FromStr for InitLoraWeights {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "true" => return Ok(Self::Default),
            "false" => return Ok(Self::Random),
            "gaussian" => return Ok(Self::Gaussian),
            "pissa" => return Ok(Self::Pissa { niter: None }),
            "loftq" => return Ok(Self::Loftq { iters: 1 }),
            _ => {}
        }
        if s.eq_ignore_ascii_case("olora") {
            return Ok(Self::Olora);
        }
        if let Some(n) = s.strip_prefix("pissa_niter_") {
            let niter = n.parse::<u32>().map_err(|_| {
                anyhow::anyhow!("`{s}`: the number of iterations after pissa_niter_ must be a whole number, as in pissa_niter_16")
            })?;
            return Ok(Self::Pissa { niter: Some(niter) });
        }
        if let Some((_, why)) = UNSUPPORTED_INITS
            .iter()
            .find(|(name, _)| s.to_ascii_lowercase().starts_with(name))
        {
            bail!("`{s}`: {why} (peft-rs supports {EXPECTED_INITS})");
        }
        bail!("`{s}`: expected {EXPECTED_INITS}")
    }
}

impl fmt::Display for InitLoraWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("true"),
            Self::Random => f.write_str("false"),
            Self::Gaussian => f.write_str("gaussian"),
            Self::Pissa { niter: None } => f.write_str("pissa"),
            Self::Pissa { niter: Some(n) } => write!(f, "pissa_niter_{n}"),
            Self::Olora => f.write_str("olora"),
            Self::Loftq { .. } => f.write_str("loftq"),
        }
    }
}

impl InitLoraWeights {
    /// PEFT's JSON form: true, false or a string.
    pub fn to_json(self) -> Value {
        match self {
            Self::Default => json!(true),
            Self::Random => json!(false),
            other => json!(other.to_string()),
        }
    }

    fn from_json(v: Option<&Value>) -> Result<Self> {
        match v {
            None | Some(Value::Bool(true)) => Ok(Self::Default),
            Some(Value::Bool(false)) => Ok(Self::Random),
            Some(Value::String(s)) => s
                .parse()
                .map_err(|e| anyhow::anyhow!("`init_lora_weights` = {e}")),
            Some(v) => bail!("`init_lora_weights` = {v} is not supported ({EXPECTED_INITS})"),
        }
    }

    /// Whether this initialisation changes the base weights (PiSSA and
    /// OLoRA leave the residual W − scaling·BA in the base layer, LoftQ its
    /// quantization).
    pub fn mutates_base(self) -> bool {
        matches!(self, Self::Pissa { .. } | Self::Olora | Self::Loftq { .. })
    }

    /// Whether an adapter of this initialisation is saved converted to a
    /// plain LoRA adapter against the original base (PiSSA, OLoRA: their
    /// change to the base is of rank r). LoftQ's change, W − Q, is not of
    /// low rank: its adapter is saved as it is, for its quantized base,
    /// as PEFT saves it.
    pub fn converted_on_save(self) -> bool {
        matches!(self, Self::Pissa { .. } | Self::Olora)
    }
}

/// A LoRA adapter's configuration, with PEFT's field names (serde and clap
/// give the settings' names: see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default = "LoraConfig::training")]
pub struct LoraConfig {
    /// LoRA rank r.
    #[serde(rename = "lora_rank", alias = "r")]
    #[arg(id = "lora_rank", long = "lora-rank", alias = "r", value_name = "R",
          default_value_t = LoraConfig::training().r)]
    pub r: usize,
    /// LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with rsLoRA).
    #[arg(long, default_value_t = LoraConfig::training().lora_alpha)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input (training only).
    #[arg(long, default_value_t = LoraConfig::training().lora_dropout)]
    pub lora_dropout: f64,
    /// all-linear, or a comma-separated list such as q_proj,v_proj.
    #[arg(long, default_value_t = LoraConfig::training().target_modules)]
    pub target_modules: TargetModules,
    /// Modules never adapted: a regex (whole path) or names (suffix match).
    #[arg(skip)]
    pub exclude_modules: Option<TargetModules>,
    /// Only these decoder-layer indices.
    #[arg(skip)]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Parameters adapted directly rather than through a linear module
    /// (PEFT's `target_parameters`): a mixture of experts' 3D expert tensors
    /// (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and its router
    /// (`mlp.gate.weight`; gpt-oss's `mlp.router.weight`). See [`super::param`].
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NAMES",
        long_help = "Parameters adapted directly (PEFT's target_parameters), comma-separated: a mixture \
of experts' mlp.experts.gate_up_proj, mlp.experts.down_proj and its router (mlp.gate.weight; \
gpt-oss: mlp.router.weight), or one layer's (7.mlp.experts.gate_up_proj). Needs --lora-dropout 0."
    )]
    pub target_parameters: Vec<String>,
    /// Per-module rank overrides: pattern (suffix regex) -> r.
    #[arg(skip)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides: pattern (suffix regex) -> alpha.
    #[arg(skip)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// rsLoRA scaling (alpha / sqrt(r)).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = false)]
    pub use_rslora: bool,
    /// DoRA (weight-decomposed LoRA).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = false)]
    pub use_dora: bool,
    /// How new adapters start: true (kaiming-uniform A, zero B), gaussian,
    /// false, pissa, pissa_niter_N or olora (these two leave the residual
    /// in the base; the adapter is saved as a plain LoRA adapter of twice
    /// the rank against the original base, as PEFT converts it).
    #[arg(long, value_name = "true|false|gaussian|pissa|pissa_niter_N|olora",
          default_value_t = InitLoraWeights::Default)]
    pub init_lora_weights: InitLoraWeights,
    /// The base model the adapter was trained on (recorded, not enforced).
    #[serde(skip)]
    #[arg(skip)]
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    /// PEFT's defaults: r = 8, lora_alpha = 8, no dropout, q_proj and v_proj
    /// (PEFT's default for Llama-family models).
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            exclude_modules: None,
            layers_to_transform: None,
            target_parameters: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: false,
            use_dora: false,
            init_lora_weights: InitLoraWeights::Default,
            base_model_name_or_path: None,
        }
    }
}

impl LoraConfig {
    /// The defaults of instruction tuning (r 16, alpha 32, dropout 0.05,
    /// every linear layer), which training starts from.
    pub fn training() -> Self {
        Self {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: TargetModules::AllLinear,
            ..Self::default()
        }
    }
}

/// The widest rank accepted.
pub const MAX_RANK: usize = 65_536;
/// The largest scaling (alpha / r, or alpha / √r) accepted.
pub const MAX_SCALING: f64 = 1e5;

/// PEFT fields we read and understand (the fuzz test draws its keys from it).
pub const KNOWN_FIELDS: &[&str] = &[
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "target_parameters",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "loftq_config",
    "bias",
    "base_model_name_or_path",
    "inference_mode",
    "fan_in_fan_out",
    "modules_to_save",
];

/// PEFT fields that record where an adapter came from and change nothing.
const INFORMATIONAL: &[&str] = &[
    "revision",
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
];

impl LoraConfig {
    /// scaling for a module with rank `r` and alpha `alpha`.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Checks values PEFT would also refuse, with the field named.
    pub fn validate(&self) -> Result<()> {
        match self.problem() {
            None => Ok(()),
            Some((field, problem)) => bail!("`{field}` {problem}"),
        }
    }

    /// The first value that cannot work, as (PEFT field, what is wrong).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        let bad = |field, problem: String| Some((field, problem));
        if self.r == 0 {
            return bad("r", "must be at least 1".into());
        }
        if !(self.lora_alpha > 0.0 && self.lora_alpha.is_finite()) {
            return bad(
                "lora_alpha",
                format!("must be a finite number > 0, got {}", self.lora_alpha),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            );
        }
        if self.r > MAX_RANK || self.rank_pattern.values().any(|&r| r > MAX_RANK) {
            return bad(
                "r",
                format!("(or a `rank_pattern` value) must be at most {MAX_RANK}; no LoRA adapter is that wide"),
            );
        }
        // An adapter whose scaling is this large overflows fp32 in its first
        // forward pass and makes every output NaN.
        let scalings = std::iter::once((self.r, self.lora_alpha))
            .chain(self.rank_pattern.values().map(|&r| (r, self.lora_alpha)))
            .chain(self.alpha_pattern.values().map(|&a| (self.r, a)));
        for (r, alpha) in scalings {
            let s = self.scaling(r.max(1), alpha);
            if !(s.is_finite() && s <= MAX_SCALING) {
                return bad(
                    "lora_alpha",
                    format!("{alpha} with r {r} gives scaling {s:e}, above {MAX_SCALING:e}; the adapter would overflow"),
                );
            }
        }
        if !self.target_parameters.is_empty() {
            // PEFT's ParamWrapper refuses these too.
            if self.lora_dropout != 0.0 {
                return bad(
                    "lora_dropout",
                    format!(
                        "is {}: LoRA on `target_parameters` (a mixture of experts' router and experts, which \
                         `all-linear` takes there) has no dropout, and PEFT refuses it as well; set it to 0 \
                         (--lora-dropout 0) or name the modules to adapt",
                        self.lora_dropout
                    ),
                );
            }
            if self.use_dora {
                return bad(
                    "use_dora",
                    "is true: DoRA does not apply to `target_parameters` (PEFT refuses it as well)"
                        .into(),
                );
            }
        }
        if let TargetModules::Names(names) = &self.target_modules {
            if names.is_empty() || names.iter().any(String::is_empty) {
                return bad("target_modules", "must name at least one module".into());
            }
            let mut seen = std::collections::BTreeSet::new();
            for n in names {
                if !seen.insert(n) {
                    return bad("target_modules", format!("lists `{n}` twice"));
                }
            }
        }
        for (k, &r) in &self.rank_pattern {
            if r == 0 {
                return bad("rank_pattern", format!("gives `{k}` rank 0"));
            }
        }
        for (k, &a) in &self.alpha_pattern {
            if a.is_nan() || a <= 0.0 {
                return bad(
                    "alpha_pattern",
                    format!("gives `{k}` alpha {a}; it must be > 0"),
                );
            }
        }
        for pattern in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            if let Err(e) = Regex::new(pattern) {
                return bad(
                    "rank_pattern",
                    format!("key `{pattern}` is not a regex: {e}"),
                );
            }
        }
        if let TargetModules::Regex(r) = &self.target_modules {
            if let Err(e) = Regex::new(r) {
                return bad("target_modules", format!("regex `{r}`: {e}"));
            }
        }
        let init = self.init_lora_weights;
        if matches!(init, InitLoraWeights::Loftq { .. }) && self.use_dora {
            return bad(
                "use_dora",
                "with `init_lora_weights` = loftq is not implemented; use one or the other"
                    .to_owned(),
            );
        }
        if init.converted_on_save() && self.use_dora {
            return bad(
                "use_dora",
                format!("with `init_lora_weights` = {init}: such an adapter is saved as a plain LoRA adapter against the original base, which has no form for DoRA's magnitude; use one or the other"),
            );
        }
        if init.converted_on_save()
            && self.use_rslora
            && !(self.rank_pattern.is_empty() && self.alpha_pattern.is_empty())
        {
            return bad(
                "rank_pattern",
                format!("(or `alpha_pattern`) with `use_rslora` and `init_lora_weights` = {init}: the adapter could not be saved as a plain LoRA adapter (PEFT refuses this conversion too)"),
            );
        }
        None
    }

    /// The configuration a [`InitLoraWeights::mutates_base`] adapter is
    /// saved with, once converted to a plain LoRA adapter against the
    /// original base (PEFT's `path_initial_model_for_weight_conversion`):
    /// twice the rank, with alpha doubled (×√2 with rsLoRA) so that the
    /// scaling stays, and the default initialisation. Other configurations
    /// are returned as they are.
    pub fn converted_for_saving(&self) -> Self {
        if !self.init_lora_weights.converted_on_save() {
            return self.clone();
        }
        let alpha_factor = if self.use_rslora { 2f64.sqrt() } else { 2.0 };
        Self {
            r: 2 * self.r,
            lora_alpha: self.lora_alpha * alpha_factor,
            rank_pattern: self
                .rank_pattern
                .iter()
                .map(|(k, r)| (k.clone(), 2 * r))
                .collect(),
            alpha_pattern: self
                .alpha_pattern
                .iter()
                .map(|(k, a)| (k.clone(), 2.0 * a))
                .collect(),
            init_lora_weights: InitLoraWeights::Default,
            ..self.clone()
        }
    }

    /// Reads `DIR/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let (path, json) = crate::peft_json::read(dir)?;
        Self::from_json(&json).with_context(|| path.display().to_string())
    }

    /// Parses PEFT's JSON, refusing options peft-rs does not implement.
    /// (Long on purpose: one field of `adapter_config.json` after another,
    /// each with its own error.)
    pub fn from_json(json: &Value) -> Result<Self> {
        let known: Vec<&str> = KNOWN_FIELDS.iter().chain(INFORMATIONAL).copied().collect();
        let obj = peft_json::object(json, &known, "LoraConfig")?;
        match obj.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => bail!("`peft_type` is `{other}`; expected LORA here"),
            None => bail!("`peft_type` missing (PEFT writes \"LORA\")"),
        }
        let bias = obj.get("bias").and_then(Value::as_str).unwrap_or("none");
        if bias != "none" {
            bail!("`bias` is `{bias}`; only \"none\" is supported (biases stay frozen)");
        }
        let d = Self::default();
        let r = peft_json::rank(obj, d.r)?;
        let target_modules =
            peft_json::targets(obj, "target_modules")?.context("`target_modules` missing")?;
        let exclude_modules = peft_json::targets(obj, "exclude_modules")?;
        let layers_to_transform = peft_json::layers(obj)?;
        let init_lora_weights = with_loftq_config(
            InitLoraWeights::from_json(obj.get("init_lora_weights"))?,
            obj.get("loftq_config"),
        )?;
        let rank_pattern = pattern(obj, "rank_pattern", "an integer", |v| {
            v.as_u64().map(|x| x as usize)
        })?;
        let alpha_pattern = pattern(obj, "alpha_pattern", "a number", Value::as_f64)?;
        let c = Self {
            r,
            lora_alpha: peft_json::number(obj, "lora_alpha", d.lora_alpha)?,
            lora_dropout: peft_json::number(obj, "lora_dropout", 0.0)?,
            target_modules,
            exclude_modules,
            layers_to_transform,
            target_parameters: target_parameters(obj)?,
            rank_pattern,
            alpha_pattern,
            use_rslora: peft_json::boolean(obj, "use_rslora", false)?,
            use_dora: peft_json::boolean(obj, "use_dora", false)?,
            init_lora_weights,
            base_model_name_or_path: peft_json::base_model(obj),
        };
        c.validate()?;
        Ok(c)
    }

    /// The `adapter_config.json` PEFT writes for this configuration.
    pub fn to_json(&self) -> Value {
        let targets = TargetModules::to_json;
        json!({
            "alpha_pattern": self.alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "exclude_modules": self.exclude_modules.as_ref().map(targets),
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": self.init_lora_weights.to_json(),
            "layers_pattern": null,
            "loftq_config": match self.init_lora_weights {
                InitLoraWeights::Loftq { iters } => json!({"loftq_bits": 4, "loftq_iter": iters}),
                _ => json!({}),
            },
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": self.rank_pattern,
            "revision": null,
            "target_modules": targets(&self.target_modules),
            "target_parameters": if self.target_parameters.is_empty() {
                Value::Null
            } else {
                json!(self.target_parameters)
            },
            "task_type": "CAUSAL_LM",
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        })
    }

    /// Rank and alpha for the module at `path` (after `rank_pattern` / `alpha_pattern`).
    pub fn rank_and_alpha(&self, path: &str) -> (usize, f64) {
        let r = pattern_value(&self.rank_pattern, path).unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        (r, alpha)
    }

    /// Which of `linear_paths` get an adapter (see [`select_modules`]).
    pub fn select<'a>(&self, linear_paths: &[&'a str], output_head: &str) -> Result<Vec<&'a str>> {
        select_modules(
            &self.target_modules,
            self.exclude_modules.as_ref(),
            self.layers_to_transform.as_deref(),
            linear_paths,
            output_head,
        )
    }
}

/// `target_parameters`: absent, null or a list of parameter names.
fn target_parameters(obj: &serde_json::Map<String, Value>) -> Result<Vec<String>> {
    match obj.get("target_parameters") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .with_context(|| {
                        format!("`target_parameters` holds {v}; expected parameter names")
                    })
            })
            .collect(),
        Some(other) => bail!("`target_parameters` is {other}; expected a list of parameter names"),
    }
}

/// `init` with the iterations of `loftq_config` when it is LoftQ (PEFT's
/// `LoftQConfig`: `loftq_bits` 4, `loftq_iter` default 1); a LoftQ config
/// beside another initialisation changes nothing, as in PEFT.
fn with_loftq_config(init: InitLoraWeights, loftq: Option<&Value>) -> Result<InitLoraWeights> {
    let InitLoraWeights::Loftq { .. } = init else {
        return Ok(init);
    };
    let empty = serde_json::Map::new();
    let cfg = match loftq {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(v) => bail!("`loftq_config` must be an object such as {{\"loftq_bits\": 4, \"loftq_iter\": 1}}, found {v}"),
    };
    if cfg.is_empty() {
        bail!("`init_lora_weights` = loftq needs `loftq_config` (PEFT's LoftQConfig: {{\"loftq_bits\": 4, \"loftq_iter\": 1}})");
    }
    if let Some((k, _)) = cfg
        .iter()
        .find(|(k, _)| !["loftq_bits", "loftq_iter"].contains(&k.as_str()))
    {
        bail!(
            "`loftq_config.{k}` is not a LoftQConfig field peft-rs reads (loftq_bits, loftq_iter)"
        );
    }
    match cfg.get("loftq_bits").map(Value::as_u64) {
        None | Some(Some(4)) => {}
        Some(Some(8)) => bail!("`loftq_config.loftq_bits` = 8 is not implemented: peft-rs quantizes LoftQ bases to 4-bit NF4 (loftq_bits 4)"),
        Some(_) => bail!("`loftq_config.loftq_bits` must be 4 (NF4), found {}", cfg["loftq_bits"]),
    }
    let iters = match cfg.get("loftq_iter") {
        None => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=u32::MAX as u64).contains(n))
            .with_context(|| {
                format!("`loftq_config.loftq_iter` must be a whole number >= 1, found {v}")
            })? as u32,
    };
    Ok(InitLoraWeights::Loftq { iters })
}

/// `rank_pattern` / `alpha_pattern`: an object of module pattern -> value.
pub(crate) fn pattern<T>(
    obj: &Map<String, Value>,
    k: &str,
    what: &str,
    value: impl Fn(&Value) -> Option<T>,
) -> Result<BTreeMap<String, T>> {
    let entries = match obj.get(k) {
        None | Some(Value::Null) => return Ok(Default::default()),
        Some(Value::Object(m)) => m,
        Some(v) => bail!("`{k}` must be an object, found {v}"),
    };
    entries
        .iter()
        .map(|(p, v)| {
            let x = value(v).with_context(|| format!("`{k}.{p}` must be {what}"))?;
            Ok((p.clone(), x))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every initialisation reads back from its PEFT spelling, in flags and JSON.
    #[test]
    fn initialisations_round_trip_through_their_peft_names() {
        for s in [
            "true",
            "false",
            "gaussian",
            "pissa",
            "pissa_niter_16",
            "olora",
        ] {
            let init: InitLoraWeights = s.parse().unwrap();
            assert_eq!(init.to_string(), s);
            assert_eq!(
                InitLoraWeights::from_json(Some(&init.to_json())).unwrap(),
                init
            );
        }
        assert!(InitLoraWeights::from_json(Some(&json!("eva"))).is_err());
    }

    /// The converted configuration keeps every module's scaling at twice the
    /// rank, with rsLoRA too, and starts from the default initialisation.
    #[test]
    fn converted_configuration_keeps_the_scaling() {
        for use_rslora in [false, true] {
            let c = LoraConfig {
                init_lora_weights: InitLoraWeights::Pissa { niter: None },
                use_rslora,
                r: 8,
                lora_alpha: 16.0,
                alpha_pattern: if use_rslora {
                    BTreeMap::new()
                } else {
                    [("q_proj".to_owned(), 4.0)].into()
                },
                rank_pattern: if use_rslora {
                    BTreeMap::new()
                } else {
                    [("q_proj".to_owned(), 2)].into()
                },
                ..LoraConfig::default()
            };
            c.validate().unwrap();
            let s = c.converted_for_saving();
            assert_eq!(s.init_lora_weights, InitLoraWeights::Default);
            for path in [
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.mlp.up_proj",
            ] {
                let (r, a) = c.rank_and_alpha(path);
                let (r2, a2) = s.rank_and_alpha(path);
                assert_eq!(r2, 2 * r);
                assert!(
                    (s.scaling(r2, a2) - c.scaling(r, a)).abs() < 1e-12,
                    "{path}"
                );
            }
        }
    }
}
