//! Rotary position embeddings as transformers computes them: the schemes
//! (`default`, `linear`, `llama3`, Phi-3's `longrope`) read from
//! `rope_parameters`/`rope_scaling`, the frequencies, and their application
//! to queries and keys (all dimensions, or Phi-3's leading part).

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::config_json::RawConfig;

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq = 1 / theta^(2i/d)`.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Overall scaling factor.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
    },
    /// LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): per-frequency divisors,
    /// `short_factor` while a forward pass's sequence length (the largest
    /// position + 1) is at most `original_max_position_embeddings`,
    /// `long_factor` beyond it; cos and sin are multiplied by `attention_factor`.
    LongRope {
        /// Divisors of the frequencies for sequences up to the original length.
        short_factor: Vec<f64>,
        /// Divisors of the frequencies for longer sequences.
        long_factor: Vec<f64>,
        /// The length above which `long_factor` applies.
        original_max_position_embeddings: i64,
        /// What cos and sin are multiplied by.
        attention_factor: f64,
    },
    /// YaRN (gpt-oss; Qwen3 and others for long contexts): frequencies
    /// blended between interpolated and extrapolated by a linear ramp over
    /// the dimensions between the `beta_fast` and `beta_slow` rotation
    /// counts, and cos/sin scaled by `attention_factor`.
    Yarn {
        /// The context extension factor.
        factor: f64,
        /// What cos and sin are multiplied by.
        attention_factor: f64,
        /// Rotations above which frequencies are kept (extrapolated).
        beta_fast: f64,
        /// Rotations below which frequencies are interpolated.
        beta_slow: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
        /// Whether the correction range is rounded to whole dimensions.
        truncate: bool,
    },
}

/// RoPE settings from `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (earlier versions).
pub(crate) fn rope(raw: &RawConfig) -> Result<(f64, RopeScaling)> {
    let params = raw
        .json
        .get("rope_parameters")
        .filter(|v| !v.is_null())
        .or_else(|| raw.json.get("rope_scaling").filter(|v| !v.is_null()));
    let field = if raw.json.contains_key("rope_parameters") {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let theta = raw.opt_f64("rope_theta")?.unwrap_or(10000.0);
    rope_from(raw, params, field, theta)
}

/// RoPE settings from one `rope_parameters`-style object (`None`: the
/// default RoPE with `theta`), named `field` in errors. An unknown
/// `rope_type` is refused by name.
pub fn rope_from(
    raw: &RawConfig,
    params: Option<&serde_json::Value>,
    field: &str,
    theta: f64,
) -> Result<(f64, RopeScaling)> {
    let theta = raw.number_in(params, field, "rope_theta")?.unwrap_or(theta);
    let rope_type = match raw.str_in(params, field, "rope_type")? {
        Some(t) => t,
        None => raw.str_in(params, field, "type")?.unwrap_or("default"),
    };
    let need = |k: &str| {
        raw.number_in(params, field, k)?.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: field `{field}.{k}` missing for rope_type {rope_type}",
                raw.path.display()
            )
        })
    };
    // Phi-3's config maps the names of earlier releases to `longrope`.
    let phi3 = raw.model_type()? == "phi3";
    let rope_type = match rope_type {
        "su" | "yarn" if phi3 => "longrope",
        t => t,
    };
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "longrope" if phi3 => long_rope(raw, params, field)?,
        "longrope" => bail!(
            "{}: field `{field}.rope_type` is `longrope`, which peft-rs implements for Phi-3 \
             (model_type phi3) only",
            raw.path.display()
        ),
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "yarn" => yarn(raw, params, field)?,
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => bail!(
            "{}: field `{field}.rope_type` is `{other}`; supported: default, linear, llama3, yarn, longrope (phi3)",
            raw.path.display()
        ),
    };
    Ok((theta, scaling))
}

/// Phi-3's LongRoPE settings, read as transformers' `Phi3Config` does: the
/// top-level `original_max_position_embeddings` (4096 when absent) wins over
/// one inside the RoPE parameters, and the attention factor defaults to
/// `sqrt(1 + ln(factor) / ln(original))` with `factor` =
/// `max_position_embeddings / original` unless the parameters give one.
/// `rope_type` yarn, with transformers' defaults (`_compute_yarn_parameters`):
/// `factor` from the position counts when absent, `attention_factor` from
/// `mscale`/`mscale_all_dim` or `0.1·ln(factor) + 1`, betas 32 and 1,
/// `truncate` true.
fn yarn(raw: &RawConfig, params: Option<&serde_json::Value>, field: &str) -> Result<RopeScaling> {
    let number = |k: &str| raw.number_in(params, field, k);
    let original = match number("original_max_position_embeddings")? {
        Some(o) => o,
        None => raw.opt_usize("max_position_embeddings")?.unwrap_or(4096) as f64,
    };
    let factor = match number("factor")? {
        Some(f) => f,
        None => raw.opt_usize("max_position_embeddings")?.unwrap_or(4096) as f64 / original,
    };
    raw.ensure(
        factor.is_finite() && factor > 0.0 && original >= 1.0,
        &format!("{field}.factor"),
        "must be positive, with original_max_position_embeddings at least 1",
    )?;
    let get_mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let attention_factor = match number("attention_factor")? {
        Some(a) => a,
        None => match (number("mscale")?, number("mscale_all_dim")?) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                get_mscale(factor, m) / get_mscale(factor, all)
            }
            _ => get_mscale(factor, 1.0),
        },
    };
    let beta = |k: &str, default: f64| -> Result<f64> {
        Ok(number(k)?.filter(|b| *b != 0.0).unwrap_or(default))
    };
    let truncate = params
        .and_then(|p| p.get("truncate"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true);
    Ok(RopeScaling::Yarn {
        factor,
        attention_factor,
        beta_fast: beta("beta_fast", 32.0)?,
        beta_slow: beta("beta_slow", 1.0)?,
        original_max_position_embeddings: original,
        truncate,
    })
}

fn long_rope(
    raw: &RawConfig,
    params: Option<&serde_json::Value>,
    field: &str,
) -> Result<RopeScaling> {
    let factors = |k: &str| -> Result<Vec<f64>> {
        let list = params.and_then(|p| p.get(k)).and_then(|v| v.as_array());
        let values: Option<Vec<f64>> = list.and_then(|a| a.iter().map(|v| v.as_f64()).collect());
        match values {
            Some(v) if !v.is_empty() && v.iter().all(|x| x.is_finite() && *x > 0.0) => Ok(v),
            _ => bail!(
                "{}: field `{field}.{k}` must be a list of positive numbers for rope_type longrope",
                raw.path.display()
            ),
        }
    };
    let short_factor = factors("short_factor")?;
    let long_factor = factors("long_factor")?;
    let original = raw
        .opt_usize("original_max_position_embeddings")?
        .unwrap_or(4096);
    raw.ensure(
        original > 1,
        "original_max_position_embeddings",
        "must be above 1",
    )?;
    let get = |k: &str| params.and_then(|p| p.get(k)).filter(|v| !v.is_null());
    let number = |k: &str| -> Result<Option<f64>> {
        get(k)
            .map(|v| {
                v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: field `{field}.{k}` must be a number",
                        raw.path.display()
                    )
                })
            })
            .transpose()
    };
    let attention_factor = match number("attention_factor")? {
        Some(a) => a,
        None => {
            let factor = match number("factor")? {
                Some(f) => f,
                None => {
                    let max = raw.opt_usize("max_position_embeddings")?.unwrap_or(4096);
                    max as f64 / original as f64
                }
            };
            if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / (original as f64).ln()).sqrt()
            }
        }
    };
    raw.ensure(
        attention_factor > 0.0,
        &format!("{field}.attention_factor"),
        "must be positive",
    )?;
    Ok(RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings: original as i64,
        attention_factor,
    })
}

/// Precomputed rotary frequencies.
pub struct RotaryEmbedding {
    inv_freq: Tensor,
    /// LongRoPE: the frequencies for sequences longer than the `i64`.
    pub(crate) long: Option<(Tensor, i64)>,
    /// What cos and sin are multiplied by (LongRoPE's attention factor; else 1).
    attention_scaling: f64,
}

impl RotaryEmbedding {
    pub(crate) fn new(
        rotary_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        device: Device,
    ) -> Self {
        // Computed with the same fp32 tensor operations as transformers'
        // `_compute_default_rope_parameters` / `_compute_llama3_parameters` /
        // `_compute_longrope_parameters`, so that frequencies agree to the last bit.
        let d = rotary_dim as i64;
        let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / d as f64;
        let powers = Tensor::pow_scalar(theta, &exponent);
        let inv_freq = powers.reciprocal();
        let divided = |factors: &[f64]| {
            let f = Tensor::from_slice(factors).to_kind(Kind::Float);
            (f * &powers).reciprocal().to_device(device)
        };
        let (inv_freq, long, attention_scaling) = match scaling {
            RopeScaling::Default => (inv_freq, None, 1.0),
            RopeScaling::Linear { factor } => (inv_freq / *factor, None, 1.0),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = 2.0 * std::f64::consts::PI / &inv_freq;
                let scaled = (&inv_freq / factor).where_self(&wavelen.gt(low_wavelen), &inv_freq);
                let smooth =
                    (old / &wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed: Tensor = (1.0 - &smooth) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen
                    .lt(high_wavelen)
                    .logical_not()
                    .logical_and(&wavelen.gt(low_wavelen).logical_not());
                (smoothed.where_self(&medium, &scaled), None, 1.0)
            }
            &RopeScaling::Yarn {
                factor,
                attention_factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings,
                truncate,
            } => {
                // transformers' find_correction_range, in f64 as Python's math.
                let correction = |rotations: f64| {
                    d as f64
                        * (original_max_position_embeddings
                            / (rotations * 2.0 * std::f64::consts::PI))
                            .ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                let ramp = ((Tensor::arange(d / 2, (Kind::Float, Device::Cpu)) - low)
                    / (high - low))
                    .clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let interpolated = (&powers * factor).reciprocal();
                let blended = interpolated * (1.0 - &extrapolation) + &inv_freq * &extrapolation;
                (blended, None, attention_factor)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => (
                divided(short_factor),
                Some((divided(long_factor), *original_max_position_embeddings)),
                *attention_factor,
            ),
        };
        Self {
            inv_freq: inv_freq.to_device(device),
            long,
            attention_scaling,
        }
    }

    /// The inverse frequencies (for sequences up to the original length, with LongRoPE).
    pub(crate) fn inv_freq(&self) -> &Tensor {
        &self.inv_freq
    }

    /// Whether the frequencies depend on the sequence length (LongRoPE).
    pub(crate) fn depends_on_length(&self) -> bool {
        self.long.is_some()
    }

    /// The frequencies for a forward pass whose sequence length (largest
    /// position + 1, as transformers' `longrope_frequency_update` takes it)
    /// is `seq_len`: LongRoPE's long ones above the original length.
    fn inv_freq_for(&self, seq_len: i64) -> &Tensor {
        match &self.long {
            Some((long, original)) if seq_len > *original => long,
            _ => &self.inv_freq,
        }
    }

    fn cos_sin_of(&self, emb: Tensor, kind: Kind) -> (Tensor, Tensor) {
        let (cos, sin) = (emb.cos(), emb.sin());
        if self.attention_scaling == 1.0 {
            return (cos.to_kind(kind), sin.to_kind(kind));
        }
        let a = self.attention_scaling;
        ((cos * a).to_kind(kind), (sin * a).to_kind(kind))
    }

    /// `cos` and `sin` for positions `offset..offset+len`, `[1, 1, len, head_dim]`.
    pub(crate) fn cos_sin(&self, offset: i64, len: i64, kind: Kind) -> (Tensor, Tensor) {
        let inv_freq = self.inv_freq_for(offset + len);
        let pos = Tensor::arange_start(offset, offset + len, (Kind::Float, inv_freq.device()));
        let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(0).unsqueeze(0);
        self.cos_sin_of(emb, kind)
    }

    /// `cos` and `sin` for per-row positions `[batch, seq]`, `[batch, 1, seq, head_dim]`
    /// (packed examples restart at 0; left-padded rows start after their
    /// padding), in a forward pass of sequence length `seq_len`.
    pub(crate) fn cos_sin_at(
        &self,
        position_ids: &Tensor,
        seq_len: i64,
        kind: Kind,
    ) -> (Tensor, Tensor) {
        let inv_freq = self.inv_freq_for(seq_len);
        let pos = position_ids
            .to_device(inv_freq.device())
            .to_kind(Kind::Float);
        let freqs = pos.unsqueeze(-1) * inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        self.cos_sin_of(emb, kind)
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

pub(crate) fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let d = x.size().last().copied().unwrap_or(0);
    let r = cos.size().last().copied().unwrap_or(0);
    if r == d {
        return x * cos + rotate_half(x) * sin;
    }
    // Partial rotary (Phi-3): the first `r` dimensions rotate, the rest pass.
    let x_rot = x.narrow(-1, 0, r);
    let rotated = &x_rot * cos + rotate_half(&x_rot) * sin;
    Tensor::cat(&[&rotated, &x.narrow(-1, r, d - r)], -1)
}
