//! `model.layers.N.self_attn`, with what attention needs around it: the
//! layout of a batch (causal, packed, left-padded), the masks built from it
//! once per forward pass, the kernel a call can use, and the KV cache.

use tch::{Device, Kind, Tensor};

use super::rope::apply_rotary;
use crate::nn::{forward_same_input_with, Linear, Products, RmsNorm};

/// Keys and values of earlier positions, one entry per layer.
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        match self.layers.first() {
            Some(Some((k, _))) => k.size()[2],
            _ => 0,
        }
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows `rows` (finished rows leave a batched generation).
    pub fn select_rows(&mut self, rows: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, rows);
            *v = v.index_select(0, rows);
        }
    }
}

/// How the tokens of a batch may see each other.
#[derive(Clone, Copy)]
pub enum AttentionLayout<'a> {
    /// Causal within each row. Padding, if any, is on the right, where real
    /// tokens never see it; the fast kernels apply (no mask).
    Causal,
    /// Several examples packed in each row: causal within each segment, no
    /// attention across segments. `[batch, seq]` segment ids (1, 2, ...; 0 on
    /// padding).
    Packed {
        /// `[batch, seq]` segment ids.
        segment_ids: &'a Tensor,
    },
    /// Left-padded rows (batched generation): `[batch, past + seq]`, 1 on
    /// real tokens, 0 on padding, over the cached and the new positions.
    Padded {
        /// `[batch, past + seq]` attention mask.
        attention_mask: &'a Tensor,
    },
}

/// The tokens a decoder forward pass reads and how they are laid out.
#[derive(Clone, Copy)]
pub struct DecoderInput<'a> {
    /// `[batch, seq]` token ids.
    pub input_ids: &'a Tensor,
    /// `[batch, seq]` positions for RoPE; `None`: past..past+seq for every row.
    pub position_ids: Option<&'a Tensor>,
    /// How tokens attend.
    pub layout: AttentionLayout<'a>,
}

impl<'a> DecoderInput<'a> {
    /// A right-padded (or unpadded) batch: positions from 0, causal attention.
    pub fn causal(input_ids: &'a Tensor) -> Self {
        Self {
            input_ids,
            position_ids: None,
            layout: AttentionLayout::Causal,
        }
    }
}

/// Which attention kernel a call can use. Flash attention takes no mask; the
/// memory-efficient kernel (libtorch 2.11) takes no unequal head counts; with
/// both a mask and grouped-query attention only the math kernel (which builds
/// fp32 `[b, h, t, T]` scores) would remain, so keys and values are expanded to
/// the query heads first, as transformers' `repeat_kv` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// No mask, causal: flash or memory-efficient kernels, grouped heads as they are.
    CausalGrouped,
    /// No mask, causal, equal head counts.
    Causal,
    /// No mask and no causal rule (one query over cached keys).
    Full,
    /// A mask; keys and values expanded to the query heads when they are grouped.
    Masked {
        /// Whether keys and values are repeated to the query heads.
        expand_kv: bool,
    },
}

impl AttentionPath {
    /// The path for `q_heads` query heads over `kv_heads` key/value heads,
    /// `q_len` queries, with or without an explicit mask.
    pub fn choose(q_heads: i64, kv_heads: i64, q_len: i64, masked: bool) -> Self {
        let grouped = kv_heads != q_heads;
        match (masked, q_len > 1) {
            (true, _) => Self::Masked { expand_kv: grouped },
            (false, true) if grouped => Self::CausalGrouped,
            (false, true) => Self::Causal,
            (false, false) => Self::Full,
        }
    }
}

/// `model.layers.N.self_attn`.
pub struct Attention {
    /// `q_proj`.
    pub q_proj: Linear,
    /// `k_proj`.
    pub k_proj: Linear,
    /// `v_proj`.
    pub v_proj: Linear,
    /// `o_proj`.
    pub o_proj: Linear,
    /// `qkv_proj` (Phi-3; empty elsewhere).
    pub qkv_proj: Linear,
    /// `q_norm`, over each query head (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm>,
    /// `k_norm`, over each key head (Qwen3, Gemma 3).
    pub k_norm: Option<RmsNorm>,
    /// `sinks`, `[heads]`: one more logit in each softmax row, whose
    /// probability is dropped (gpt-oss).
    pub sinks: Option<Tensor>,
    pub(crate) num_heads: i64,
    pub(crate) num_kv_heads: i64,
    pub(crate) head_dim: i64,
    pub(crate) sliding_window: Option<i64>,
    pub(crate) scale: f64,
    pub(crate) fused: bool,
}

impl Attention {
    /// Attention over `x` (normed hidden states). The frozen products of the
    /// projections are kept or replayed as `products` says (under gradient
    /// checkpointing that keeps them), queries, keys and values first, then
    /// the output projection's.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        products: &mut Products<'_>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are [batch, seq, hidden]");
        let (cos, sin) = rope;
        // `[b, t, n, d]`, normed per head where the model does, then `[b, n, t, d]`.
        let heads = |y: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let y = y.view([b, t, n, self.head_dim]);
            match norm {
                Some(norm) => norm.forward(&y),
                None => y,
            }
            .transpose(1, 2)
        };
        let (q, k, v) = if self.fused {
            let [qkv] = forward_same_input_with([&self.qkv_proj], x, products);
            let (nq, nkv) = (
                self.num_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
            );
            (
                qkv.narrow(-1, 0, nq),
                qkv.narrow(-1, nq, nkv),
                qkv.narrow(-1, nq + nkv, nkv),
            )
        } else {
            let qkv = [&self.q_proj, &self.k_proj, &self.v_proj];
            let [q, k, v] = forward_same_input_with(qkv, x, products);
            (q, k, v)
        };
        let q = heads(q, self.num_heads, &self.q_norm);
        let q = apply_rotary(&q, cos, sin);
        let k = heads(k, self.num_kv_heads, &self.k_norm);
        let mut k = apply_rotary(&k, cos, sin);
        let mut v = heads(v, self.num_kv_heads, &None);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let path = AttentionPath::choose(self.num_heads, self.num_kv_heads, t, mask.is_some());
        let scale = Some(self.scale);
        let y = match (&self.sinks, path) {
            (Some(sinks), _) => self.attention_with_sinks(&q, &k, &v, mask, sinks),
            (None, path) => match path {
                AttentionPath::Masked { expand_kv } => {
                    if expand_kv {
                        let rep = self.num_heads / self.num_kv_heads;
                        k = k.repeat_interleave_self_int(rep, 1, None);
                        v = v.repeat_interleave_self_int(rep, 1, None);
                    }
                    Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, scale, false)
                }
                AttentionPath::CausalGrouped | AttentionPath::Causal | AttentionPath::Full => {
                    let causal = path != AttentionPath::Full;
                    crate::flash_attention::unmasked(&q, &k, &v, causal, self.scale)
                }
            },
        };
        let y = y
            .transpose(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim]);
        let [out] = forward_same_input_with([&self.o_proj], &y, products);
        out
    }
}

impl Attention {
    /// Attention with a sink logit per head, as transformers' gpt-oss eager
    /// attention computes it (no fused kernel takes sinks): scores in the
    /// model dtype, masked, the head's sink appended to every row, the row
    /// maximum subtracted, softmax, the sink's column dropped. `mask`
    /// (`true`: may attend) is `None` where the causal rule alone applies.
    fn attention_with_sinks(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        sinks: &Tensor,
    ) -> Tensor {
        let rep = self.num_heads / self.num_kv_heads;
        let (k, v) = if rep > 1 {
            (
                k.repeat_interleave_self_int(rep, 1, None),
                v.repeat_interleave_self_int(rep, 1, None),
            )
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        let scores = q.matmul(&k.transpose(2, 3)) * self.scale;
        let (b, h, t, total) = scores.size4().expect("[batch, heads, queries, keys]");
        let causal;
        let allowed = match mask {
            Some(m) => Some(m),
            None if t > 1 => {
                causal = Tensor::ones([t, total], (Kind::Bool, q.device())).tril(total - t);
                Some(&causal)
            }
            None => None,
        };
        let scores = match allowed {
            Some(m) => scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY),
            None => scores,
        };
        let sink = sinks
            .to_kind(scores.kind())
            .reshape([1, h, 1, 1])
            .expand([b, h, t, 1], false);
        let combined = Tensor::cat(&[scores, sink], -1);
        let combined = &combined - combined.amax([-1].as_slice(), true);
        let probs = combined.softmax(-1, combined.kind()).narrow(-1, 0, total);
        probs.to_kind(v.kind()).matmul(&v)
    }
}

/// The boolean attention masks of one forward pass (`true`: may attend),
/// built once and shared by every layer with the same window.
pub(crate) struct Masks<'a> {
    layout: AttentionLayout<'a>,
    past: i64,
    len: i64,
    device: Device,
    built: Vec<(Option<i64>, Option<Tensor>)>,
}

impl<'a> Masks<'a> {
    pub(crate) fn new(layout: AttentionLayout<'a>, past: i64, len: i64, device: Device) -> Self {
        Self {
            layout,
            past,
            len,
            device,
            built: Vec::new(),
        }
    }

    /// The mask for a layer with sliding `window`, or `None` where the
    /// causal rule alone (or no rule, for one query) says it all.
    pub(crate) fn get(&mut self, window: Option<i64>) -> Option<&Tensor> {
        if let Some(i) = self.built.iter().position(|(w, _)| *w == window) {
            return self.built[i].1.as_ref();
        }
        let m = self.build(window);
        self.built.push((window, m));
        self.built.last().and_then(|(_, m)| m.as_ref())
    }

    fn build(&self, window: Option<i64>) -> Option<Tensor> {
        let (past, t) = (self.past, self.len);
        let total = past + t;
        let window_bites = window.is_some_and(|w| total > w);
        let q = Tensor::arange_start(past, total, (Kind::Int64, self.device)).unsqueeze(1);
        let k = Tensor::arange(total, (Kind::Int64, self.device)).unsqueeze(0);
        let causal_window = || {
            let mut allowed = k.le_tensor(&q);
            if let Some(w) = window {
                allowed = allowed.logical_and(&(&q - &k).lt(w));
            }
            allowed
        };
        match self.layout {
            AttentionLayout::Causal => {
                if !window_bites && (past == 0 || t == 1) {
                    return None;
                }
                Some(causal_window())
            }
            AttentionLayout::Packed { segment_ids } => {
                // [b, 1, t, t]: same segment, not padding, and causal.
                let seg = segment_ids.to_device(self.device);
                let same = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1));
                let real = seg.ne(0).unsqueeze(1);
                Some(
                    same.logical_and(&real)
                        .logical_and(&causal_window())
                        .unsqueeze(1),
                )
            }
            AttentionLayout::Padded { attention_mask } => {
                // [b, 1, t, T]: real keys only, and causal.
                let keys = attention_mask.to_device(self.device).ne(0).unsqueeze(1);
                Some(keys.logical_and(&causal_window()).unsqueeze(1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AttentionPath;

    #[test]
    fn attention_path_expands_grouped_keys_whenever_a_mask_is_passed() {
        use AttentionPath::*;
        // (query heads, kv heads, query length, mask) -> path; SmolLM2 is 9 over 3.
        let cases = [
            // Training or prefill without padding: flash/efficient, GQA native.
            ((9, 3, 128, false), CausalGrouped),
            ((8, 8, 128, false), Causal),
            // One new token over the cache, nothing to mask.
            ((9, 3, 1, false), Full),
            ((8, 8, 1, false), Full),
            // Padding, packing, sliding windows (also decoding past the window):
            // a mask with grouped heads would leave only the math kernel.
            ((9, 3, 128, true), Masked { expand_kv: true }),
            ((9, 3, 1, true), Masked { expand_kv: true }),
            ((8, 8, 128, true), Masked { expand_kv: false }),
            ((8, 8, 1, true), Masked { expand_kv: false }),
        ];
        for ((q, kv, t, masked), want) in cases {
            assert_eq!(
                AttentionPath::choose(q, kv, t, masked),
                want,
                "{q}/{kv} heads, t={t}, mask={masked}"
            );
        }
    }
}
