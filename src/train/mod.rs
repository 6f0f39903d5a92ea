//! `peft-rs train`: LoRA fine-tuning of a frozen base with pluggable regularizers.
//!
//! The run is: set up ([`trainer`]: model, data, adapters, regularizers,
//! optimizer) → resume ([`resume`]) → for each step, [`Trainer::train_step`]
//! ([`step`]: forward and backward of each micro-batch, the loss with its
//! gradient from [`loss`], the all-reduce of several processes in
//! [`crate::dist`], the update) → evaluate ([`eval`]) and checkpoint on
//! schedule → save the adapter ([`run`], with [`progress`] for what is
//! shown and logged). Everything random (adapter init, data order,
//! dropout, NEFTune noise) is derived from `seed` and the step, so the same
//! settings give the same loss curve, and a resumed run continues it exactly.

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod loss;
pub mod optim;
pub mod plan;
pub mod progress;
pub mod resume;
pub mod router_loss;
pub mod run;
pub mod scaler;
pub mod settings_file;
pub mod step;
pub mod tensorboard;
pub mod trainer;
pub mod validate;

pub use checkpoint::TrainerState;
pub use config::{ReportTo, Schedule, TrainConfig};
pub use eval::mean_loss;
pub use loss::chunked_cross_entropy;
pub use plan::EpochPlan;
pub use run::Summary;
pub use scaler::LossScaler;
pub use step::{
    apply_loss_regularizers, forward_backward, forward_backward_parts, MicroBatch, MicroBatchLoss,
    StepOptions, StepStats,
};
pub use trainer::Trainer;
pub use validate::InvalidSetting;
