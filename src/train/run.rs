//! The training loop: resume or start, write the run's settings, train step
//! by step with progress, metrics, evaluation and checkpoints, stop when
//! every rank agrees to, and write the adapter.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::checkpoint;
use super::progress::{keep_metrics_until, MetricsLog, PlainProgress};
use super::Trainer;
use crate::dist::agree;
use crate::peft_model::{self, DEFAULT_ADAPTER};
use crate::signals;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Optimizer steps taken in total (including before a resume).
    pub steps: u64,
    /// Steps skipped because fp16 gradients overflowed (loss scaling).
    pub skipped_steps: u64,
    /// Training loss of the last step (measured with regularizers on).
    pub final_train_loss: f64,
    /// Evaluation loss before the first step, if there is eval data.
    pub eval_loss_before: Option<f64>,
    /// Evaluation loss at the end.
    pub eval_loss_after: Option<f64>,
    /// Wall time of this process's training loop.
    pub seconds: f64,
    /// Real (non-pad) tokens processed per second.
    pub tokens_per_second: f64,
    /// Where the adapter was written.
    pub output: PathBuf,
    /// Bytes of the frozen base weights in memory (quantized layers as stored).
    pub frozen_weight_bytes: usize,
    /// Bytes per parameter of the quantized linear layers, when there are some.
    pub quantized_bytes_per_param: Option<f64>,
}

impl Trainer {
    /// Runs the whole training loop with a progress bar, metrics, evaluation
    /// and checkpoints, and saves the final adapter.
    ///
    /// When [`crate::signals::install`] was called, a first SIGINT/SIGTERM/SIGHUP
    /// ends the run after the current step with a checkpoint, returning
    /// [`crate::signals::Interrupted`].
    pub fn run(&mut self) -> Result<Summary> {
        let output = self.cfg.output.clone();
        let metrics_path = output.join("metrics.jsonl");
        let writer = self.is_writer();
        let start_step = if self.cfg.resume {
            let s = self.resume()?;
            if writer {
                keep_metrics_until(&metrics_path, s)?;
                eprintln!(
                    "resuming from {} at step {s}",
                    output.join(format!("checkpoint-{s}")).display()
                );
            }
            s
        } else {
            // Only rank 0's output matters: the other ranks never write.
            let fresh = if writer
                && (!checkpoint::list(&output).is_empty()
                    || output.join("adapter_model.safetensors").exists())
            {
                Err(anyhow::anyhow!(
                    "{}: already holds a run; pass --resume to continue it or choose another --output",
                    output.display()
                ))
            } else {
                Ok(())
            };
            agree::fail_together(self.group.as_ref(), "to start a run in its --output", fresh)?;
            if writer {
                let _ = std::fs::remove_file(&metrics_path);
            }
            0
        };
        // The settings and the adapter's configuration are written first; the
        // adapter weights last, in one rename: a directory holding both files
        // is a finished adapter, whenever the process is killed.
        if self.is_writer() {
            // The settings, and how the run was made (recorded, never read back).
            let mut args = serde_json::to_value(&self.cfg)?;
            args["world_size"] = json!(self.rank_and_world().1);
            peft_adapters::fsio::write_atomic(
                &output.join("training_args.json"),
                serde_json::to_string_pretty(&args)?.as_bytes(),
            )?;
            peft_adapters::fsio::write_atomic(
                &output.join(peft_adapters::lora::files::CONFIG_FILE),
                serde_json::to_string_pretty(&self.lora.to_json())?.as_bytes(),
            )?;
        }
        if writer {
            eprintln!("{}", peft_model::trainable_parameters_line(&self.model));
            eprintln!(
            "{} training examples ({}; {} truncated to {} tokens, {} dropped), {} steps of {} x {}{}{}",
            self.train.examples.len(),
            self.train.format.name(),
            self.train.truncated,
            self.cfg.max_seq_length,
            self.train.dropped,
            self.total_steps,
            self.cfg.per_device_train_batch_size,
            self.cfg.gradient_accumulation_steps,
            if self.regs.is_empty() { String::new() } else { format!(", regularizers: {}", self.regs.names().join(", ")) },
            if self.scaler.is_some() { ", fp16 with dynamic loss scaling" } else { "" }
        );
        }
        let mut metrics = MetricsLog::open(&metrics_path, self.is_writer())?;
        // A signal that arrived while loading stops every rank before the first step.
        if let Some(sig) = agree::agree(self.group.as_ref(), true, signals::pending())?.stop {
            self.stop_on(sig, start_step, false)?;
        }
        let eval_before = if start_step == 0 {
            self.evaluate()?
        } else {
            None
        };
        if let Some(l) = eval_before {
            metrics.write(&json!({"step": 0, "eval_loss": l}))?;
        }
        // Only rank 0 shows progress; every rank prints its errors.
        let bar = if writer {
            ProgressBar::new(self.total_steps)
        } else {
            ProgressBar::hidden()
        }
        .with_position(start_step);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut plain = PlainProgress::new(self.total_steps - start_step);
        plain.on &= writer;
        let t0 = Instant::now();
        let (mut tokens, mut last_loss) = (0i64, f64::NAN);
        let mut eval_after = None;
        for step in start_step..self.total_steps {
            let s = self.train_step(step)?;
            tokens += s.tokens;
            last_loss = s.loss;
            let done = step + 1;
            let tps = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                s.loss, s.lr, tps
            ));
            bar.inc(1);
            plain.step(done, self.total_steps, start_step, &s, tps);
            let mut line = json!({
                "step": done, "epoch": self.plan.epoch_after(done), "loss": s.loss, "lr": s.lr,
                "grad_norm": s.grad_norm, "tokens_per_second": tps,
            });
            if let Some(sc) = &self.scaler {
                line["loss_scale"] = json!(sc.scale());
                line["skipped"] = json!(s.skipped);
            }
            let eval_now = self.cfg.eval_steps > 0 && done % self.cfg.eval_steps == 0
                || done == self.total_steps;
            if eval_now {
                if let Some(l) = self.evaluate()? {
                    line["eval_loss"] = json!(l);
                    eval_after = Some(l);
                    bar.println(format!("step {done}: eval loss {l:.4}"));
                }
            }
            if done % self.cfg.logging_steps == 0 || eval_now {
                metrics.write(&line)?;
            }
            if self.cfg.save_steps > 0 && done % self.cfg.save_steps == 0 && done < self.total_steps
            {
                self.save_checkpoint(done)?;
            }
            if let (Some(sig), true) = (s.stop, done < self.total_steps) {
                self.stop_on(sig, done, true)
                    .inspect_err(|_| bar.abandon())?;
            }
        }
        bar.finish_and_clear();
        self.check_finite()?;
        if self.is_writer() {
            let tensors = peft_model::adapter_tensors(&self.model, DEFAULT_ADAPTER);
            peft_adapters::lora::files::write_safetensors(
                &output.join(peft_adapters::lora::files::WEIGHTS_FILE),
                &tensors,
            )?;
        }
        // Every rank leaves together, after the adapter is written.
        if let Some(g) = &self.group {
            g.barrier()?;
        }
        let seconds = t0.elapsed().as_secs_f64();
        let (frozen_weight_bytes, qbytes, qparams) = self.model.frozen_bytes();
        Ok(Summary {
            steps: self.total_steps,
            skipped_steps: self.skipped_steps,
            final_train_loss: last_loss,
            eval_loss_before: eval_before,
            eval_loss_after: eval_after,
            seconds,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            output,
            frozen_weight_bytes,
            quantized_bytes_per_param: (qparams > 0).then(|| qbytes as f64 / qparams as f64),
        })
    }
}
