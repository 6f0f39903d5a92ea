//! The gradient all-reduce of data-parallel training: every adapter
//! gradient, the loss and each rank's stop request, in flat buckets.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::zero::{buckets, BUCKET_ELEMENTS};
use super::{agree, ProcessGroup};

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

/// Sums every gradient of `params` and the loss over the ranks, in flat
/// fp32 buckets of at most [`BUCKET_ELEMENTS`], with each rank's stop request
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
    let numels: Vec<i64> = grads.iter().map(|g| g.numel() as i64).collect();
    let device = grads.first().map_or(tch::Device::Cpu, Tensor::device);
    let mut tail = vec![loss as f32];
    tail.extend(agree::stop_vote(pending).map(|v| v as f32));
    let tail_len = tail.len() as i64;
    group.at(&format!("the gradient all-reduce of step {}", step + 1))?;
    // Waiting for the slowest rank and moving the bytes are timed apart.
    let t = Instant::now();
    group.barrier()?;
    let waited_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // In buckets, so that a step never holds a second copy of every gradient;
    // the loss and the votes travel with the last.
    let mut ranges = buckets(&numels, BUCKET_ELEMENTS);
    if ranges.is_empty() {
        ranges.push(0..0);
    }
    let last = ranges.len() - 1;
    let mut summed_tail = Vec::new();
    for (b, range) in ranges.into_iter().enumerate() {
        let mut parts: Vec<Tensor> = range
            .clone()
            .map(|i| grads[i].to_kind(Kind::Float).reshape([-1]))
            .collect();
        if b == last {
            parts.push(Tensor::from_slice(&tail).to_device(device));
        }
        let mut bucket = Tensor::cat(&parts, 0);
        drop(parts);
        group.all_reduce_sum(&mut bucket)?;
        let mut offset = 0;
        for i in range {
            let summed = bucket
                .narrow(0, offset, numels[i])
                .view(grads[i].size().as_slice());
            grads[i].shallow_clone().copy_(&summed);
            offset += numels[i];
        }
        if b == last {
            summed_tail = Vec::<f32>::try_from(&bucket.narrow(0, offset, tail_len))?;
        }
    }
    let moved_seconds = t.elapsed().as_secs_f64();
    let votes: Vec<f64> = summed_tail[1..].iter().map(|&v| f64::from(v)).collect();
    Ok(Reduced {
        loss: f64::from(summed_tail[0]),
        stop: agree::agreed_stop(&votes),
        waited_seconds,
        moved_seconds,
    })
}
