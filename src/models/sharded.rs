//! The frozen base sharded over ranks (`--fsdp`, see [`crate::dist::fsdp`])
//! as the decoder sees it: which unit is gathered around each layer and
//! the loss, and which is started meanwhile. The decoder calls
//! [`LlamaForCausalLM::gather_layer`] around each layer and nothing else.

use std::sync::Arc;

use super::decoder::{layer_linears, LlamaForCausalLM};
use crate::dist::fsdp::{Fsdp, Gathered, IdleHead, ShardedUnits, UnitId};
use crate::nn::Linear;
use crate::quant::FrozenWeight;

impl LlamaForCausalLM {
    /// Layer `i`, whole while the guard lives (`--fsdp`); the gather of the
    /// layer that runs next is started meanwhile: the next layer, or the
    /// head after the last, or in the backward pass (`recomputing`) the
    /// layer before.
    pub(super) fn gather_layer(&self, i: usize, recomputing: bool) -> Option<Gathered<'_>> {
        let f = self.fsdp.as_ref()?;
        let next = if recomputing {
            i.checked_sub(1).map(UnitId::Layer)
        } else if i + 1 < self.model.layers.len() {
            Some(UnitId::Layer(i + 1))
        } else if self.vocab_parallel_head().is_some() {
            None
        } else {
            Some(f.head_unit())
        };
        Some(f.gather(UnitId::Layer(i), next))
    }

    /// The output head, whole while the guard lives (`--fsdp`): taken
    /// around the loss. With `then_recompute` the last layer's gather starts
    /// meanwhile, for the checkpointed backward pass.
    pub fn gather_head(&self, then_recompute: bool) -> Option<Gathered<'_>> {
        let f = self.fsdp.as_ref()?;
        let n = self.model.layers.len();
        if self.vocab_parallel_head().is_some() {
            // The loss needs no gather: the checkpointed backward's first
            // layer (the last) is gathered meanwhile.
            if then_recompute && n > 0 {
                f.prefetch(UnitId::Layer(n - 1));
            }
            return None;
        }
        let next = (then_recompute && n > 0).then(|| UnitId::Layer(n - 1));
        Some(f.gather(f.head_unit(), next))
    }

    /// The sharded base (`--fsdp`) when its output head is used sharded by
    /// vocabulary ([`Fsdp::cross_entropy`]): a plain head, without adapter,
    /// bias or soft-capping; other heads are gathered whole for the loss.
    pub fn vocab_parallel_head(&self) -> Option<&Fsdp> {
        let plain = self.lm_head.adapter.is_none()
            && self.lm_head.bias.is_none()
            && self.config.final_logit_softcapping.is_none();
        self.fsdp.as_ref().filter(|_| plain)
    }

    /// With a sharded base (`--fsdp`), the collectives of one pass on no
    /// rows (see [`Fsdp::idle_pass`]): `training` with `recompute`
    /// (gradient checkpointing), or an evaluation pass; `chunk` is the
    /// loss's rows per chunk.
    pub fn fsdp_idle_pass(&self, training: bool, recompute: bool, chunk: i64) {
        let Some(f) = self.fsdp.as_ref() else {
            return;
        };
        let head = match self.vocab_parallel_head() {
            Some(_) => IdleHead::VocabParallel { chunk, training },
            None => IdleHead::Gathered,
        };
        f.idle_pass(training && recompute, head);
    }

    /// The sharded base's gathers (`--fsdp`), if it is sharded.
    pub fn fsdp(&self) -> Option<&Fsdp> {
        self.fsdp.as_ref()
    }

    /// [`Self::fsdp`], mutable.
    pub fn fsdp_mut(&mut self) -> Option<&mut Fsdp> {
        self.fsdp.as_mut()
    }

    /// The first failed gather of the sharded base since the last call: the
    /// pass that saw it computed on zeros and must be thrown away.
    pub fn fsdp_error(&self) -> anyhow::Result<()> {
        match self.fsdp.as_ref().and_then(Fsdp::take_error) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Starts gathering over `group` a base loaded sharded
    /// ([`super::loader::Weights::sharded`]): each decoder layer is one
    /// unit, the embeddings (with a tied head) another, an untied head a third.
    pub fn start_fsdp(&mut self, group: Arc<crate::dist::ProcessGroup>) -> anyhow::Result<()> {
        let Some(embedding) = self.sharded_embedding.clone() else {
            anyhow::bail!("the base was not loaded sharded");
        };
        let sharded = |l: &Linear| match &l.weight {
            FrozenWeight::Sharded(s) => Some(s.clone()),
            _ => None,
        };
        let layers = (0..self.model.layers.len())
            .map(|i| {
                let names = self.layer_linear_names(i);
                layer_linears!(self.model.layers[i])
                    .into_iter()
                    .filter(|(n, _)| names.contains(n))
                    .filter_map(|(_, l)| sharded(l))
                    .collect()
            })
            .collect();
        let head = if self.config.tie_word_embeddings {
            None
        } else {
            sharded(&self.lm_head)
        };
        let units = ShardedUnits {
            layers,
            embedding,
            head,
        };
        self.fsdp = Some(Fsdp::new(group, units, self.device));
        Ok(())
    }
}
