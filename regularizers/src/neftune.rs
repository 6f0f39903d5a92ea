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

peft_adapters::value_enum_text!(NeftuneMode, "--neftune-mode");

/// The distribution of `ε`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NoiseDistribution {
    /// `U(-1, 1)`, as in the paper.
    Uniform,
    /// `N(0, 1)`, the paper's ablation.
    Gaussian,
}

peft_adapters::value_enum_text!(NoiseDistribution, "--neftune-noise");

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
                    Some(seg) => segment_lengths(&seg.to_device(embeddings.device())),
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

/// Each position's segment length in `[batch, T]` segment ids (ids are at
/// most `T`; 0 marks padding, whose count is masked out later): the tokens
/// of each id counted per row, then read back at every position. O(T) per
/// row, where comparing every pair of positions would build a `[B, T, T]`
/// matrix (1 GB at batch 4 and T 8192).
pub fn segment_lengths(seg: &Tensor) -> Tensor {
    let (b, t) = seg.size2().expect("segment ids are [batch, seq]");
    let counts = Tensor::zeros([b, t + 1], (Kind::Float, seg.device())).scatter_add(
        1,
        seg,
        &Tensor::ones([b, t], (Kind::Float, seg.device())),
    );
    counts.gather(1, seg, false)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_lengths_count_each_rows_ids() {
        // Row 0: segments of 3 and 2 tokens, then 2 pads; row 1: one of 4, 3 pads.
        let seg = Tensor::from_slice(&[1i64, 1, 1, 2, 2, 0, 0, 1, 1, 1, 1, 0, 0, 0]).view([2, 7]);
        let got = Vec::<f32>::try_from(segment_lengths(&seg).view([-1])).unwrap();
        assert_eq!(
            got,
            [3., 3., 3., 2., 2., 2., 2., 4., 4., 4., 4., 3., 3., 3.],
            "pads count as their own segment (masked out by the caller)"
        );
        // The same as comparing every pair of positions, on random ids.
        let seg = Tensor::randint(5, [3, 50], (Kind::Int64, tch::Device::Cpu));
        let pairwise = seg
            .unsqueeze(2)
            .eq_tensor(&seg.unsqueeze(1))
            .to_kind(Kind::Float)
            .sum_dim_intlist(2, false, Kind::Float);
        assert!(segment_lengths(&seg).equal(&pairwise));
    }
}
