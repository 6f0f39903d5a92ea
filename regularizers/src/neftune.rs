//! NEFTune: noisy embedding fine-tuning (Jain et al., arXiv 2310.05914).
//!
//! Noise `ε · α/√(L·d)` is added to the token embeddings in training forward
//! passes only, with `ε ~ U(-1, 1)` and `d` the hidden size. Implementations
//! disagree on `L`:
//!
//! * [`NeftuneMode::Paper`] — the authors' training code: `L` is each
//!   example's number of real tokens (`attention_mask.sum(1)`), and padding
//!   gets no noise. With packing, each packed segment uses its own length.
//! * [`NeftuneMode::Hf`] — transformers' `neftune_post_forward_hook`, which
//!   TRL, Axolotl and Unsloth use: `L` is the padded length of the batch and
//!   every position is noised. For runs that must match a Python TRL run.

use std::fmt;
use std::str::FromStr;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{rng, HookContext, HookPoint, Regularizer};

/// How `L` is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NeftuneMode {
    /// Per-example real length; no noise on padding (the paper's code).
    Paper,
    /// Padded batch length; noise everywhere (transformers/TRL).
    Hf,
}

impl FromStr for NeftuneMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "paper" => Ok(Self::Paper),
            "hf" => Ok(Self::Hf),
            other => bail!("--neftune-mode `{other}`: expected paper or hf"),
        }
    }
}

impl fmt::Display for NeftuneMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Paper => "paper",
            Self::Hf => "hf",
        })
    }
}

/// The distribution of `ε`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NoiseDistribution {
    /// `U(-1, 1)`, as in the paper.
    Uniform,
    /// `N(0, 1)`, the paper's ablation.
    Gaussian,
}

impl FromStr for NoiseDistribution {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "uniform" => Ok(Self::Uniform),
            "gaussian" => Ok(Self::Gaussian),
            other => bail!("--neftune-noise `{other}`: expected uniform or gaussian"),
        }
    }
}

impl fmt::Display for NoiseDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uniform => "uniform",
            Self::Gaussian => "gaussian",
        })
    }
}

/// The NEFTune regularizer.
#[derive(Debug, Clone)]
pub struct Neftune {
    /// α (TRL's `neftune_noise_alpha`); 0 adds nothing.
    pub alpha: f64,
    /// How `L` is measured.
    pub mode: NeftuneMode,
    /// The distribution of `ε`.
    pub noise: NoiseDistribution,
}

impl Neftune {
    /// NEFTune with the paper's length rule and uniform noise.
    pub fn new(alpha: f64) -> Self {
        Self {
            alpha,
            mode: NeftuneMode::Paper,
            noise: NoiseDistribution::Uniform,
        }
    }

    /// The noise that would be added to `embeddings` (`[batch, seq, d]`), in fp32.
    /// Drawn from libtorch's generator seeded with `ctx.seed` (see [`rng`]),
    /// or row by row from `ctx.row_seeds` where the rows have seeds: in paper
    /// mode a row's draws then cover only its real tokens, so an example's
    /// noise does not depend on the padding or the other rows of its batch.
    pub fn noise(&self, embeddings: &Tensor, ctx: &HookContext) -> Tensor {
        let _g = tch::no_grad_guard();
        let (_, t, d) = embeddings
            .size3()
            .expect("embeddings are [batch, seq, hidden]");
        let eps = match ctx.row_seeds {
            Some(seeds) => self.draw_per_row(embeddings, ctx.attention_mask, seeds),
            None => rng::with_torch_seed(ctx.seed, || {
                self.draw(&embeddings.size(), embeddings.device())
            }),
        };
        match self.mode {
            NeftuneMode::Hf => eps * (self.alpha / ((t * d) as f64).sqrt()),
            NeftuneMode::Paper => {
                let mask = ctx
                    .attention_mask
                    .to_kind(Kind::Float)
                    .to_device(embeddings.device());
                let lengths = match ctx.segment_ids {
                    // Each position's segment length: positions of its row with the same id.
                    Some(seg) => {
                        let seg = seg.to_device(embeddings.device());
                        seg.unsqueeze(2)
                            .eq_tensor(&seg.unsqueeze(1))
                            .to_kind(Kind::Float)
                            .sum_dim_intlist(2, false, Kind::Float)
                    }
                    None => mask
                        .sum_dim_intlist(1, true, Kind::Float)
                        .expand([mask.size()[0], t], false),
                };
                // clamp: an all-padding row has length 0 and gets no noise anyway.
                let scale = (lengths.clamp_min(1.0) * d as f64).rsqrt() * self.alpha * &mask;
                eps * scale.unsqueeze(-1)
            }
        }
    }
}

impl Neftune {
    fn draw(&self, size: &[i64], device: tch::Device) -> Tensor {
        let mut t = Tensor::empty(size, (Kind::Float, device));
        match self.noise {
            NoiseDistribution::Uniform => t.uniform_(-1.0, 1.0),
            NoiseDistribution::Gaussian => t.normal_(0.0, 1.0),
        }
    }

    /// `ε` with each row drawn from its own seed. In paper mode only real
    /// tokens are drawn (padding gets none anyway) and scattered to their
    /// positions; in hf mode padding is noised too, so whole rows are drawn.
    fn draw_per_row(&self, embeddings: &Tensor, mask: &Tensor, seeds: &[u64]) -> Tensor {
        let (b, t, d) = embeddings.size3().expect("[batch, seq, hidden]");
        assert_eq!(seeds.len() as i64, b, "one row seed per row");
        let device = embeddings.device();
        if self.mode == NeftuneMode::Hf {
            let rows: Vec<Tensor> = seeds
                .iter()
                .map(|&s| rng::with_torch_seed(s, || self.draw(&[t, d], device)))
                .collect();
            return Tensor::stack(&rows, 0);
        }
        let real = mask
            .to_device(tch::Device::Cpu)
            .sum_dim_intlist(1, false, Kind::Int64);
        let rows: Vec<Tensor> = seeds
            .iter()
            .enumerate()
            .map(|(r, &s)| {
                let n = real.int64_value(&[r as i64]);
                rng::with_torch_seed(s, || self.draw(&[n, d], device))
            })
            .collect();
        let keep = mask
            .to_device(device)
            .ne(0)
            .unsqueeze(-1)
            .expand([b, t, d], false);
        Tensor::zeros([b, t, d], (Kind::Float, device))
            .masked_scatter(&keep, &Tensor::cat(&rows, 0))
    }
}

impl Regularizer for Neftune {
    fn name(&self) -> String {
        format!(
            "neftune(alpha={}, mode={}, noise={})",
            self.alpha, self.mode, self.noise
        )
    }

    fn hook_points(&self) -> Vec<HookPoint> {
        vec![HookPoint::EmbeddingOutput]
    }

    fn apply(&mut self, _point: HookPoint, value: Tensor, ctx: &HookContext) -> Tensor {
        if !ctx.training || self.alpha == 0.0 {
            return value;
        }
        let noise = self.noise(&value, ctx).to_kind(value.kind());
        value + noise
    }
}
