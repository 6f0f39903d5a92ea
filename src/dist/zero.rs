//! The optimizer state sharded over the ranks (ZeRO stage 1, as DeepSpeed
//! and PyTorch's `ZeroRedundancyOptimizer` do it): every adapter tensor has
//! one owner rank, which alone keeps its AdamW moments and updates it; the
//! updated tensors then travel from their owners to every rank.
//!
//! The gradients are still summed on every rank, since clipping needs the
//! global norm, and the update is element-wise, so a sharded run takes the
//! replicated optimizer's steps exactly. A checkpoint still holds the whole
//! state: the moments travel to rank 0 when it writes one, and from rank 0
//! to their owners when a run resumes, so a checkpoint does not depend on
//! whether (or over how many ranks) the state was sharded.
//!
//! With a sharded base (`--fsdp`) and gradient checkpointing, the gradients
//! are sharded too (ZeRO stage 2, [`GradShards`]): each decoder layer's
//! adapter gradients are summed over the ranks as soon as the checkpointed
//! backward pass leaves the layer, kept by their owner and dropped by the
//! others, so a rank holds its own share of the gradients and one layer's.

use std::cell::RefCell;
use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::fsdp::LayerBackward;
use super::group::set_grad;
use super::reduce::sum_in_buckets;
use super::ProcessGroup;
use crate::train::optim::AdamW;

/// Which rank keeps the optimizer state of each adapter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerShards {
    owner: BTreeMap<String, usize>,
    rank: usize,
}

impl OptimizerShards {
    /// Owners for tensors of `numels` elements over `world` ranks: the
    /// largest first, each to the rank holding the fewest elements so far
    /// (the lowest on a tie), so that every rank holds close to 1/N.
    pub fn new(numels: &BTreeMap<String, i64>, rank: usize, world: usize) -> Self {
        let mut order: Vec<(&String, i64)> = numels.iter().map(|(k, &n)| (k, n)).collect();
        order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut held = vec![0i64; world.max(1)];
        let mut owner = BTreeMap::new();
        for (k, n) in order {
            let r = (0..held.len()).min_by_key(|&r| (held[r], r)).unwrap_or(0);
            held[r] += n;
            owner.insert(k.clone(), r);
        }
        Self { owner, rank }
    }

    /// Whether this rank keeps `name`'s optimizer state.
    pub fn owns(&self, name: &str) -> bool {
        self.owner.get(name) == Some(&self.rank)
    }

    /// After each rank updated the tensors it owns: every rank's copy of
    /// every parameter made equal to its owner's.
    pub fn share_params(
        &self,
        group: &ProcessGroup,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let _g = tch::no_grad_guard();
        let items: Vec<(&String, &Tensor)> = params.iter().collect();
        let shapes: Vec<Vec<i64>> = items.iter().map(|(_, t)| t.size()).collect();
        sum_in_buckets(
            group,
            device_of(params),
            &shapes,
            |i| self.owns(items[i].0).then(|| items[i].1.shallow_clone()),
            |i, value| {
                if !self.owns(items[i].0) {
                    items[i].1.shallow_clone().copy_(value);
                }
            },
        )
    }

    /// The whole optimizer state as [`AdamW::state`] lays it out, on rank 0
    /// (every rank takes part; the others get nothing): each moment travels
    /// from its owner.
    pub fn gather_state(
        &self,
        group: &ProcessGroup,
        optim: &AdamW,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<Vec<(String, Tensor)>> {
        let _g = tch::no_grad_guard();
        let keys = moment_keys(params);
        let shapes: Vec<Vec<i64>> = keys.iter().map(|(_, k)| params[k].size()).collect();
        let held = |i: usize| moment(optim, &keys[i]).map(Tensor::shallow_clone);
        let mut out = Vec::new();
        sum_in_buckets(group, device_of(params), &shapes, held, |i, value| {
            if group.rank() == 0 {
                let t = held(i).unwrap_or_else(|| value.copy());
                out.push((state_key(&keys[i]), t));
            }
        })?;
        if group.rank() == 0 {
            out.push(("step".into(), Tensor::from_slice(&[optim.step as i64])));
        }
        Ok(out)
    }

    /// The moments of a checkpoint rank 0 read (`state`, by
    /// [`AdamW::state`]'s names; empty on the other ranks) given to the
    /// optimizer of each rank for the tensors it keeps.
    pub fn scatter_state(
        group: &ProcessGroup,
        state: &BTreeMap<String, Tensor>,
        optim: &AdamW,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let _g = tch::no_grad_guard();
        let keys = moment_keys(params);
        let shapes: Vec<Vec<i64>> = keys.iter().map(|(_, k)| params[k].size()).collect();
        let from_rank0 = |i: usize| {
            (group.rank() == 0)
                .then(|| state.get(&state_key(&keys[i])).map(Tensor::shallow_clone))
                .flatten()
        };
        sum_in_buckets(group, device_of(params), &shapes, from_rank0, |i, value| {
            if let Some(m) = moment(optim, &keys[i]) {
                m.shallow_clone().copy_(value);
            }
        })
    }
}

/// The adapter gradients sharded over the ranks (ZeRO stage 2): summed
/// layer by layer during the checkpointed backward pass ([`LayerBackward`]),
/// each kept only by the rank that owns the tensor's optimizer state.
pub struct GradShards {
    shards: OptimizerShards,
    /// Each decoder layer's adapter tensors (`model.layers.N.…`).
    layers: Vec<Vec<(String, Tensor)>>,
    /// The tensors outside every layer: summed with the loss at the end of
    /// the step, as without sharding.
    pub rest: BTreeMap<String, Tensor>,
    /// The owned gradients summed so far in this step (over the ranks and
    /// the micro-batches).
    owned: RefCell<BTreeMap<String, Tensor>>,
}

impl GradShards {
    /// The tensors of `params` by decoder layer (of `layers`).
    pub fn new(shards: &OptimizerShards, params: &BTreeMap<String, Tensor>, layers: usize) -> Self {
        let mut by_layer: Vec<Vec<(String, Tensor)>> = (0..layers).map(|_| Vec::new()).collect();
        let mut rest = BTreeMap::new();
        for (k, t) in params {
            match layer_of(k).filter(|&i| i < layers) {
                Some(i) => by_layer[i].push((k.clone(), t.shallow_clone())),
                None => {
                    rest.insert(k.clone(), t.shallow_clone());
                }
            }
        }
        Self {
            shards: shards.clone(),
            layers: by_layer,
            rest,
            owned: RefCell::new(BTreeMap::new()),
        }
    }

    /// Once every pass of the step ran: the owned tensors' `.grad` become
    /// their sums (the others have none).
    pub fn hand_over(&self) {
        let owned = self.owned.take();
        for (k, t) in self.layers.iter().flatten() {
            if let Some(g) = owned.get(k) {
                set_grad(t, Some(g));
            }
        }
    }

    /// The global norm of the step's gradients, as
    /// [`crate::train::optim::grad_norm`] gives it unsharded: each rank's
    /// owned layer gradients, summed over the ranks, and the rest (whole on
    /// every rank). NaN or inf when any gradient is.
    pub fn grad_norm(&self, group: &ProcessGroup) -> Result<f64> {
        let _g = tch::no_grad_guard();
        let squares = |ts: &mut dyn Iterator<Item = &Tensor>| -> f64 {
            ts.map(Tensor::grad)
                .filter(Tensor::defined)
                .map(|g| g.norm().to_kind(Kind::Double).double_value(&[]).powi(2))
                .sum()
        };
        let owned = squares(
            &mut self
                .layers
                .iter()
                .flatten()
                .filter(|(k, _)| self.shards.owns(k))
                .map(|(_, t)| t),
        );
        let mut sum = Tensor::from_slice(&[owned]);
        group.all_reduce_sum(&mut sum)?;
        let rest = squares(&mut self.rest.values());
        Ok((sum.double_value(&[0]) + rest).sqrt())
    }

    /// Leaves every adapter tensor without a gradient (after the update).
    pub fn clear(&self) {
        for (_, t) in self.layers.iter().flatten() {
            set_grad(t, None);
        }
    }
}

impl LayerBackward for GradShards {
    /// Sums layer `layer`'s gradients over the ranks (zeros where a rank has
    /// none: it had no rows), adds each owned one to the step's sum, and
    /// drops them all from the tensors.
    fn layer_done(&self, group: &ProcessGroup, layer: usize) -> Result<()> {
        let _g = tch::no_grad_guard();
        let Some(items) = self.layers.get(layer).filter(|v| !v.is_empty()) else {
            return Ok(());
        };
        let shapes: Vec<Vec<i64>> = items.iter().map(|(_, t)| t.size()).collect();
        let device = items[0].1.device();
        let mut owned = self.owned.borrow_mut();
        let local = |i: usize| Some(items[i].1.grad()).filter(Tensor::defined);
        sum_in_buckets(group, device, &shapes, local, |i, sum| {
            let k = &items[i].0;
            if self.shards.owns(k) {
                match owned.get(k) {
                    Some(acc) => {
                        let _ = acc.shallow_clone().f_add_(sum);
                    }
                    None => {
                        // A copy: a view would keep the whole bucket.
                        owned.insert(k.clone(), sum.to_dtype(items[i].1.kind(), false, true));
                    }
                }
            }
        })?;
        for (_, t) in items {
            set_grad(t, None);
        }
        Ok(())
    }
}

/// The decoder layer a parameter belongs to (`….layers.N.…`).
fn layer_of(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// (first moment?, parameter name) of every moment, in [`AdamW::state`]'s order.
fn moment_keys(params: &BTreeMap<String, Tensor>) -> Vec<(bool, String)> {
    [true, false]
        .into_iter()
        .flat_map(|first| params.keys().map(move |k| (first, k.clone())))
        .collect()
}

/// The moment `key` names, if this rank's optimizer keeps it.
fn moment<'a>(optim: &'a AdamW, (first, k): &(bool, String)) -> Option<&'a Tensor> {
    match first {
        true => optim.exp_avg.get(k),
        false => optim.exp_avg_sq.get(k),
    }
}

fn device_of(params: &BTreeMap<String, Tensor>) -> tch::Device {
    params
        .values()
        .next()
        .map_or(tch::Device::Cpu, Tensor::device)
}

fn state_key((first, k): &(bool, String)) -> String {
    format!("{}.{k}", if *first { "exp_avg" } else { "exp_avg_sq" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_belongs_to_the_layer_its_module_path_names() {
        let lora = "base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight";
        assert_eq!(layer_of(lora), Some(12));
        assert_eq!(
            layer_of("model.layers.0.mlp.experts.3.w1.lora_B.weight"),
            Some(0)
        );
        assert_eq!(layer_of("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(layer_of("model.layers.norm.weight"), None);
    }

    #[test]
    fn owners_split_the_elements_evenly_and_every_tensor_has_one() {
        let numels: BTreeMap<String, i64> = (0..30)
            .flat_map(|l| {
                [
                    ("q", 18_432),
                    ("k", 12_288),
                    ("v", 12_288),
                    ("gate", 33_792),
                ]
                .map(|(m, n)| (format!("layers.{l}.{m}"), n))
            })
            .collect();
        let total: i64 = numels.values().sum();
        for world in [1, 2, 3, 8] {
            let shards: Vec<OptimizerShards> = (0..world)
                .map(|r| OptimizerShards::new(&numels, r, world))
                .collect();
            for k in numels.keys() {
                assert_eq!(shards.iter().filter(|s| s.owns(k)).count(), 1, "{k}");
            }
            for s in &shards {
                let held: i64 = numels
                    .iter()
                    .filter(|(k, _)| s.owns(k))
                    .map(|(_, n)| n)
                    .sum();
                let even = total / world as i64;
                assert!(
                    (held - even).abs() <= 33_792,
                    "world {world}: {held} vs {even}"
                );
            }
        }
    }
}
