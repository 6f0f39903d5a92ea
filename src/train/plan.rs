//! How optimizer steps map onto epochs and micro-batches, as transformers'
//! Trainer counts them: each epoch has `ceil(N / GA)` optimizer steps over
//! its N micro-batches, the last one shorter when GA does not divide N, and
//! no step takes micro-batches from two epochs.

use std::ops::Range;

/// The shape of a run: micro-batches per epoch and gradient accumulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochPlan {
    /// Micro-batches in one pass over the training data.
    pub batches_per_epoch: u64,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: u64,
}

impl EpochPlan {
    /// Optimizer steps per epoch: `ceil(N / GA)` (transformers'
    /// `num_update_steps_per_epoch`).
    pub fn steps_per_epoch(&self) -> u64 {
        self.batches_per_epoch
            .div_ceil(self.gradient_accumulation_steps.max(1))
            .max(1)
    }

    /// Steps of a run: `max_steps` when > 0, else `ceil(epochs · steps per epoch)`.
    pub fn total_steps(&self, epochs: f64, max_steps: u64) -> u64 {
        if max_steps > 0 {
            return max_steps;
        }
        ((epochs * self.steps_per_epoch() as f64).ceil() as u64).max(1)
    }

    /// The epoch of optimizer step `step` (0-based) and the indices of its
    /// micro-batches in that epoch's batch order.
    pub fn micro_batches(&self, step: u64) -> (u64, Range<u64>) {
        let spe = self.steps_per_epoch();
        let (epoch, j) = (step / spe, step % spe);
        let ga = self.gradient_accumulation_steps.max(1);
        let start = j * ga;
        (epoch, start..((j + 1) * ga).min(self.batches_per_epoch))
    }

    /// The fractional epoch after `steps` optimizer steps, as transformers
    /// logs it: whole epochs plus the share of this epoch's micro-batches done.
    pub fn epoch_after(&self, steps: u64) -> f64 {
        if steps == 0 {
            return 0.0;
        }
        let (epoch, range) = self.micro_batches(steps - 1);
        epoch as f64 + range.end as f64 / self.batches_per_epoch.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_batches_four_per_step_three_epochs_is_nine_steps() {
        let p = EpochPlan {
            batches_per_epoch: 10,
            gradient_accumulation_steps: 4,
        };
        assert_eq!(p.steps_per_epoch(), 3);
        assert_eq!(p.total_steps(3.0, 0), 9);
        assert_eq!(p.micro_batches(2), (0, 8..10));
        assert_eq!(p.micro_batches(3), (1, 0..4));
        let epochs: Vec<f64> = (1..=9).map(|s| p.epoch_after(s)).collect();
        assert_eq!(epochs, [0.4, 0.8, 1.0, 1.4, 1.8, 2.0, 2.4, 2.8, 3.0]);
        assert_eq!(p.total_steps(3.0, 5), 5);
    }
}
