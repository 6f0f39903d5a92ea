//! Batches: right-padded rows with their masks, positions and packed
//! segments, and the order in which a run reads them.

use tch::Tensor;

use super::{Example, IGNORE};
use peft_regularizers::rng::SplitMix64;

/// A right-padded batch.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]` token ids (i64), padded with the pad id.
    pub input_ids: Tensor,
    /// `[B, T]` targets (i64), [`IGNORE`] on padding and masked prompts.
    pub labels: Tensor,
    /// `[B, T]` (i64), 1 on real tokens and 0 on padding.
    pub attention_mask: Tensor,
    /// Real (non-padding) tokens in the batch.
    pub num_tokens: i64,
    /// Positions that take a loss (labels at 1..T that are not ignored), the
    /// denominator of a token-mean loss across gradient-accumulation steps.
    pub num_label_tokens: i64,
    /// With packing, `[B, T]` positions restarting at 0 for each example.
    pub position_ids: Option<Tensor>,
    /// With packing, `[B, T]` segment ids (1, 2, ... per example; 0 on padding).
    pub segment_ids: Option<Tensor>,
}

impl Batch {
    /// How the decoder reads this batch (`ids` and `segments` on the model's device).
    pub fn decoder_input<'a>(
        &'a self,
        ids: &'a Tensor,
        segments: Option<&'a Tensor>,
    ) -> crate::models::DecoderInput<'a> {
        use crate::models::{AttentionLayout, DecoderInput};
        match segments {
            Some(segment_ids) => DecoderInput {
                input_ids: ids,
                position_ids: self.position_ids.as_ref(),
                layout: AttentionLayout::Packed { segment_ids },
            },
            None => DecoderInput::causal(ids),
        }
    }
}

/// Pads examples on the right to the longest of them.
pub fn collate(examples: &[&Example], pad_id: i64) -> Batch {
    let t = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(1);
    let b = examples.len();
    let (mut ids, mut labels, mut mask) = (
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
    );
    let (mut num_tokens, mut num_label_tokens) = (0i64, 0i64);
    let packed = examples.iter().any(|e| !e.segments.is_empty());
    let (mut positions, mut segment_ids) = (Vec::new(), Vec::new());
    for e in examples {
        let n = e.input_ids.len();
        debug_assert_eq!(n, e.labels.len(), "input_ids and labels differ in length");
        ids.extend(
            e.input_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, t - n)),
        );
        labels.extend(
            e.labels
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE, t - n)),
        );
        mask.extend(std::iter::repeat_n(1i64, n).chain(std::iter::repeat_n(0, t - n)));
        num_tokens += n as i64;
        num_label_tokens += e.num_label_tokens() as i64;
        if packed {
            let lengths = if e.segments.is_empty() {
                vec![n]
            } else {
                e.segments.clone()
            };
            for (s, &len) in lengths.iter().enumerate() {
                positions.extend(0..len as i64);
                segment_ids.extend(std::iter::repeat_n(s as i64 + 1, len));
            }
            positions.extend(std::iter::repeat_n(0, t - n));
            segment_ids.extend(std::iter::repeat_n(0, t - n));
        }
    }
    let shape = [b as i64, t as i64];
    let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape);
    Batch {
        input_ids: tensor(&ids),
        labels: tensor(&labels),
        attention_mask: tensor(&mask),
        num_tokens,
        num_label_tokens,
        position_ids: packed.then(|| tensor(&positions)),
        segment_ids: packed.then(|| tensor(&segment_ids)),
    }
}

/// The batches of one epoch as lists of example indices, from a shuffle
/// seeded by (seed, epoch). With `group_by_length`, the shuffled indices are
/// cut into mega-batches of 50 batches, each sorted by length (longest
/// first) and cut into batches, as transformers' `LengthGroupedSampler`
/// does, so that a batch holds examples of similar length and little
/// padding; the batch order is then shuffled, and the batch holding the
/// longest example goes first, as transformers' sampler puts it: a run that
/// will run out of memory does so at its first step, and the memory that
/// step leaves bounds the steps after it (see
/// [`crate::memory::KeepFreedPages`]). The last batch may be smaller.
///
/// # Panics
/// If `batch_size` is 0.
pub fn batch_order(
    lengths: &[usize],
    batch_size: usize,
    group_by_length: bool,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch_order: batch_size must be at least 1");
    // SplitMix64, not libtorch: the order must depend on the seed alone,
    // the same across platforms and libtorch versions.
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut idx);
    if !group_by_length {
        return idx.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for mega in idx.chunks(batch_size * 50) {
        let mut mega = mega.to_vec();
        // Stable, so that equal lengths keep the shuffled order.
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    // Each batch is sorted, longest first; the first longest wins a tie.
    let longest = (0..batches.len())
        .rev()
        .max_by_key(|&b| lengths[batches[b][0]]);
    if let Some(b) = longest {
        batches.swap(0, b);
    }
    batches
}
