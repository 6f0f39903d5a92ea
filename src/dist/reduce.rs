//! Sums over the ranks in flat buckets ([`sum_in_buckets`]), and with them
//! the gradient all-reduce of data-parallel training: every adapter
//! gradient, the loss and each rank's stop request.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{agree, ProcessGroup};

/// Largest number of fp32 elements summed over the ranks in one collective
/// (4 MiB): what a bucket costs in memory beyond the tensors themselves.
pub const BUCKET_ELEMENTS: i64 = 1 << 20;

/// Consecutive runs of `numels` of at most `cap` elements in all (a tensor
/// larger than `cap` alone), in order.
pub fn buckets(numels: &[i64], cap: i64) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, &n) in numels.iter().enumerate() {
        if i > start && size + n > cap {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < numels.len() {
        out.push(start..numels.len());
    }
    out
}

/// Sums tensor i (of `shapes[i]`) over the ranks and gives the sum to
/// `deliver(i, sum)` on every rank: `value(i)` is this rank's term (`None`:
/// zeros, so that one rank alone can send a tensor to all), summed in fp32
/// buckets of at most [`BUCKET_ELEMENTS`], so that no rank ever holds a
/// second copy of all of them.
pub fn sum_in_buckets(
    group: &ProcessGroup,
    device: tch::Device,
    shapes: &[Vec<i64>],
    value: impl Fn(usize) -> Option<Tensor>,
    mut deliver: impl FnMut(usize, &Tensor),
) -> Result<()> {
    let numels: Vec<i64> = shapes.iter().map(|s| s.iter().product()).collect();
    for bucket in buckets(&numels, BUCKET_ELEMENTS) {
        let parts: Vec<Tensor> = bucket
            .clone()
            .map(|i| match value(i) {
                Some(t) => t.to_kind(Kind::Float).reshape([-1]),
                None => Tensor::zeros([numels[i]], (Kind::Float, device)),
            })
            .collect();
        let mut flat = Tensor::cat(&parts, 0);
        drop(parts);
        group.all_reduce_sum(&mut flat)?;
        let mut offset = 0;
        for i in bucket {
            let sum = flat.narrow(0, offset, numels[i]).view(shapes[i].as_slice());
            deliver(i, &sum);
            offset += numels[i];
        }
    }
    Ok(())
}

/// What one all-reduce of a step gives.
pub struct Reduced {
    /// The step's loss over every rank.
    pub loss: f64,
    /// The signal every rank stops on after the step, if a rank got one.
    pub stop: Option<i32>,
    /// Seconds spent waiting for the slowest rank (load imbalance).
    pub waited_seconds: f64,
    /// Seconds spent moving the buckets once every rank arrived.
    pub moved_seconds: f64,
}

/// Sums every gradient of `params` and the loss over the ranks (with
/// [`sum_in_buckets`]), with each rank's stop request
/// (`pending`, the first signal it received) in three more slots. Each
/// rank's loss was already divided by the global number of label tokens,
/// so the sum is the gradient of the whole step's mean loss, as on one
/// process; and every rank learns the same stop decision. The summed
/// gradients replace each parameter's `.grad`.
pub fn all_reduce_gradients(
    group: &ProcessGroup,
    params: &BTreeMap<String, Tensor>,
    loss: f64,
    pending: Option<i32>,
    step: u64,
) -> Result<Reduced> {
    // A rank without rows this step (the last, short batch) has no
    // gradients yet; give it zeros so that it takes the same update.
    if params.values().any(|p| !p.grad().defined()) {
        let zero = params
            .values()
            .map(|p| (p * 0.0).sum(Kind::Float))
            .reduce(|a, b| a + b);
        if let Some(z) = zero {
            z.backward();
        }
    }
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.values().map(Tensor::grad).collect();
    let device = grads.first().map_or(tch::Device::Cpu, Tensor::device);
    let mut tail = vec![loss as f32];
    tail.extend(agree::stop_vote(pending).map(|v| v as f32));
    // The loss and the votes travel as one more tensor after the gradients.
    let tail = Tensor::from_slice(&tail).to_device(device);
    let mut shapes: Vec<Vec<i64>> = grads.iter().map(Tensor::size).collect();
    shapes.push(tail.size());
    group.at(&format!("the gradient all-reduce of step {}", step + 1))?;
    // Waiting for the slowest rank and moving the bytes are timed apart.
    let t = Instant::now();
    group.barrier()?;
    let waited_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let summed_tail = tail.zeros_like();
    let value = |i: usize| Some(grads.get(i).unwrap_or(&tail).shallow_clone());
    sum_in_buckets(group, device, &shapes, value, |i, summed| {
        let target = grads.get(i).unwrap_or(&summed_tail);
        target.shallow_clone().copy_(summed);
    })?;
    let summed_tail = Vec::<f32>::try_from(&summed_tail)?;
    let moved_seconds = t.elapsed().as_secs_f64();
    let votes: Vec<f64> = summed_tail[1..].iter().map(|&v| f64::from(v)).collect();
    Ok(Reduced {
        loss: f64::from(summed_tail[0]),
        stop: agree::agreed_stop(&votes),
        waited_seconds,
        moved_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_at_most_the_cap_unless_one_tensor_is_larger() {
        assert_eq!(buckets(&[3, 3, 3, 10, 1], 6), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(buckets(&[], 6), Vec::<Range<usize>>::new());
        assert_eq!(buckets(&[1, 1, 1], 6), vec![0..3]);
    }
}
