//! Dynamic loss scaling for fp16 training, as torch's `GradScaler` does it.
//!
//! fp16 has a smallest normal number of about 6e-5; gradients of a loss
//! averaged over thousands of tokens fall below it and flush to zero. The
//! loss is multiplied by a large scale before backward and the gradients
//! divided by it before the update. When the scaled gradients overflow, the
//! step is skipped and the scale halved; after 2000 clean steps it doubles.

use serde::{Deserialize, Serialize};

/// torch's `GradScaler` defaults: init_scale 2^16, growth 2 every 2000 clean steps, backoff 0.5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    scale: f64,
    growth_tracker: u32,
}

/// Clean steps before the scale grows.
pub const GROWTH_INTERVAL: u32 = 2000;

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_tracker: 0,
        }
    }
}

impl LossScaler {
    /// The factor the loss is multiplied by before backward.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// After a step: halve on overflow (the step was skipped), double after
    /// [`GROWTH_INTERVAL`] clean steps in a row.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= 0.5;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.growth_tracker = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut s = LossScaler::default();
        assert_eq!(s.scale(), 65536.0);
        s.update(true);
        assert_eq!(s.scale(), 32768.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(false);
        }
        assert_eq!(s.scale(), 32768.0);
        s.update(false);
        assert_eq!(s.scale(), 65536.0);
        // An overflow resets the count of clean steps.
        for _ in 0..10 {
            s.update(false);
        }
        s.update(true);
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(false);
        }
        assert_eq!(s.scale(), 32768.0);
    }
}
