//! A regularizer written outside the crates, registered under a name: this
//! program is the `peft-rs` command line with one more regularizer,
//! `adapter_l2` (λ·Σ‖w‖² over the adapter weights, added to the loss once per
//! optimizer step), which its flags and settings files name like the
//! built-in ones:
//!
//! cargo run --release --example custom_regularizer -- train --data data/dates/train.jsonl \
//!     --neftune-alpha 5 --regularizer hidden_noise:layer=2,std=0.01 \
//!     --regularizer adapter_l2:lambda=1e-4 --max-steps 10
//!
//! or `[[regularizers]]` with `kind = "adapter_l2"` and `lambda = 1e-4` in a
//! `--config` file. The run records it in `training_args.json`, and
//! `--resume` checks it like any other setting.

use peft_rs::regularizers::{HookContext, HookPoint, Registry, Regularizer};
use tch::{Kind, Tensor};

/// λ times the sum of squares of every adapter weight, added to the loss
/// once per optimizer step.
struct AdapterL2 {
    lambda: f64,
}

impl Regularizer for AdapterL2 {
    fn name(&self) -> String {
        format!("adapter_l2(lambda={})", self.lambda)
    }
    fn hook_points(&self) -> Vec<HookPoint> {
        vec![HookPoint::Loss]
    }
    fn apply(&mut self, _at: HookPoint, loss: Tensor, ctx: &HookContext) -> Tensor {
        let penalty: Tensor = ctx
            .trainable
            .iter()
            .map(|(_, w)| w.pow_tensor_scalar(2).sum(Kind::Float))
            .fold(Tensor::from(0.0f32).to_device(loss.device()), |acc, x| {
                acc + x
            });
        loss + penalty * self.lambda
    }
}

fn registry() -> Registry {
    let mut registry = Registry::builtin();
    registry.register(
        "adapter_l2",
        "λ·Σ‖w‖² over the adapter weights, added to the loss once per step",
        &[("lambda", "λ, the penalty's weight")],
        |p| {
            Ok(Box::new(AdapterL2 {
                lambda: p.number("lambda", None)?,
            }))
        },
    );
    registry
}

#[global_allocator]
static GLOBAL: peft_rs::Jemalloc = peft_rs::Jemalloc;

fn main() {
    peft_rs::cli::exit_with(&registry())
}
