//! The gradient all-reduce of data-parallel training: every adapter
//! gradient, the loss and each rank's stop request in one flat bucket.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{agree, ProcessGroup};

/// What one all-reduce of a step gives.
pub struct Reduced {
    /// The step's loss over every rank.
    pub loss: f64,
    /// The signal every rank stops on after the step, if a rank got one.
    pub stop: Option<i32>,
    /// Seconds spent waiting for the slowest rank (load imbalance).
    pub waited_seconds: f64,
    /// Seconds spent moving the bucket once every rank arrived.
    pub moved_seconds: f64,
}

/// Sums every gradient of `params` and the loss over the ranks, in one flat
/// fp32 bucket (LoRA gradients are a few MB), with each rank's stop request
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
    let mut parts: Vec<Tensor> = params
        .values()
        .map(|p| p.grad().to_kind(Kind::Float).flatten(0, -1))
        .collect();
    let device = parts.first().map_or(tch::Device::Cpu, Tensor::device);
    let mut tail = vec![loss as f32];
    tail.extend(agree::stop_vote(pending).map(|v| v as f32));
    parts.push(Tensor::from_slice(&tail).to_device(device));
    let mut bucket = Tensor::cat(&parts, 0);
    group.at(&format!("the gradient all-reduce of step {}", step + 1))?;
    // Waiting for the slowest rank and moving the bytes are timed apart.
    let t = Instant::now();
    group.barrier()?;
    let waited_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    group.all_reduce_sum(&mut bucket)?;
    let moved_seconds = t.elapsed().as_secs_f64();
    let mut offset = 0;
    for p in params.values() {
        let n = p.numel() as i64;
        let summed = bucket.narrow(0, offset, n).view(p.size().as_slice());
        p.grad().copy_(&summed);
        offset += n;
    }
    let tail = Vec::<f32>::try_from(&bucket.narrow(0, offset, 1 + agree::STOP_SLOTS as i64))?;
    let votes: Vec<f64> = tail[1..].iter().map(|&v| f64::from(v)).collect();
    Ok(Reduced {
        loss: f64::from(tail[0]),
        stop: agree::agreed_stop(&votes),
        waited_seconds,
        moved_seconds,
    })
}
