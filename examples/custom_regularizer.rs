//! A regularizer written outside the crates, trained with peft-rs as a library.
//!
//! `HiddenStateNoise` adds Gaussian noise to one decoder layer's output during
//! training; `AdapterL2` adds λ·Σ‖w‖² over the adapter weights to the loss.
//! Both run next to NEFTune, in the order given.
//!
//! cargo run --release --example custom_regularizer -- DATA.json [OUTPUT_DIR]

use std::path::PathBuf;

use anyhow::Result;
use peft_rs::regularizers::rng::with_torch_seed;
use peft_rs::regularizers::{HookContext, HookPoint, Regularizer};
use peft_rs::train::{TrainConfig, Trainer};
use tch::{Kind, Tensor};

/// Gaussian noise of standard deviation `sigma` on the output of decoder layer `layer`.
struct HiddenStateNoise {
    layer: usize,
    sigma: f64,
}

impl Regularizer for HiddenStateNoise {
    fn name(&self) -> String {
        format!("hidden-noise(layer={}, sigma={})", self.layer, self.sigma)
    }
    fn hook_points(&self) -> Vec<HookPoint> {
        vec![HookPoint::DecoderLayerOutput(self.layer)]
    }
    fn apply(&mut self, _at: HookPoint, hidden: Tensor, ctx: &HookContext) -> Tensor {
        // Drawn from the context's seed: reproducible, and identical when
        // gradient checkpointing recomputes the layer.
        let noise = with_torch_seed(ctx.seed, || hidden.randn_like().detach()) * self.sigma;
        hidden + noise
    }
}

/// λ times the sum of squares of every adapter weight, added to the loss
/// once per optimizer step.
struct AdapterL2 {
    lambda: f64,
}

impl Regularizer for AdapterL2 {
    fn name(&self) -> String {
        format!("adapter-l2(lambda={})", self.lambda)
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

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let data = args
        .next()
        .map(PathBuf::from)
        .expect("usage: custom_regularizer DATA.json [OUTPUT_DIR]");
    let output = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("runs/custom-regularizer"));
    let cfg = TrainConfig {
        data: Some(data),
        output,
        max_steps: 10,
        neftune_noise_alpha: 5.0,
        eval_holdout: 16,
        ..TrainConfig::default()
    };
    let extra: Vec<Box<dyn Regularizer>> = vec![
        Box::new(HiddenStateNoise {
            layer: 3,
            sigma: 0.01,
        }),
        Box::new(AdapterL2 { lambda: 1e-4 }),
    ];
    let mut trainer = Trainer::new(cfg, extra)?;
    let summary = trainer.run()?;
    println!("{summary:#?}");
    Ok(())
}
