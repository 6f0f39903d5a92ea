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

use std::collections::BTreeMap;

use anyhow::Result;
use tch::Tensor;

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
