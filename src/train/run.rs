//! The training loop: resume or start, write the run's settings, train step
//! by step with progress, metrics, evaluation and checkpoints, stop when
//! every rank agrees to, and write the adapter.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::checkpoint;
use super::progress::{keep_metrics_until, MetricsLog, PlainProgress};
use super::{ReportTo, Trainer};
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
    /// This process's peak resident memory, and the largest anonymous and
    /// file-backed parts sampled after each step.
    pub memory: crate::memory::MemoryWatch,
}

impl Summary {
    /// `train_summary.json`'s content: the summary, and for several
    /// processes how long the all-reduce took and how long ranks waited.
    pub fn to_json(&self, trainer: &Trainer) -> serde_json::Value {
        json!({
            "steps": self.steps, "skipped_steps": self.skipped_steps, "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second, "final_train_loss": self.final_train_loss,
            "eval_loss_before": self.eval_loss_before, "eval_loss_after": self.eval_loss_after,
            "world_size": trainer.rank_and_world().1, "all_reduce_seconds": trainer.all_reduce_seconds,
            "wait_for_ranks_seconds": trainer.wait_seconds,
            "frozen_weight_bytes": self.frozen_weight_bytes,
            "quantized_bytes_per_param": self.quantized_bytes_per_param,
            "peak_rss_bytes": self.memory.peak, "max_rss_anon_bytes": self.memory.max_anon,
            "max_rss_file_bytes": self.memory.max_file,
            "rss_before_load_bytes": trainer.rss_before_load,
            "optimizer_state_bytes": trainer.optim.state_bytes(),
            "optimizer_state_sharded": trainer.optim_shards.is_some(),
            "gradients_sharded": trainer.grad_shards.is_some(),
            "fsdp": trainer.model.fsdp().map(|f| {
                let (held, whole) = f.held_and_whole_bytes();
                json!({
                    "sharded_bytes_held": held, "sharded_bytes_whole": whole,
                    "held_fraction": held as f64 / whole.max(1) as f64,
                    "gathers": f.stats().gathers, "gathered_bytes": f.stats().bytes,
                    "gather_wait_seconds": f.stats().wait_seconds,
                })
            }),
        })
    }
}

/// What the loop has seen so far.
struct Progress {
    bar: ProgressBar,
    plain: PlainProgress,
    started: Instant,
    start_step: u64,
    tokens: i64,
    last_loss: f64,
    eval_after: Option<f64>,
    memory: crate::memory::MemoryWatch,
}

impl Trainer {
    /// Runs the whole training loop with a progress bar, metrics, evaluation
    /// and checkpoints, saves the final adapter and (rank 0)
    /// `train_summary.json`.
    ///
    /// When [`crate::signals::install`] was called, a first SIGINT/SIGTERM/SIGHUP
    /// to any rank ends the run on every rank after the same step, with a
    /// checkpoint, returning [`crate::signals::Interrupted`].
    pub fn run(&mut self) -> Result<Summary> {
        let metrics_path = self.cfg.output.join("metrics.jsonl");
        let start_step = self.start(&metrics_path)?;
        self.write_run_files()?;
        self.announce();
        let mut metrics = MetricsLog::open(&metrics_path, self.is_writer())?;
        if self.cfg.report_to == ReportTo::Tensorboard {
            metrics = metrics.with_tensorboard(&self.cfg.output.join("runs"), start_step)?;
        }
        // A signal that arrived while loading stops every rank before the first step.
        if let Some(sig) = agree::agree(self.group.as_deref(), true, signals::pending())?.stop {
            self.stop_on(sig, start_step, false)?;
        }
        let eval_before = match start_step {
            0 => self.evaluate()?,
            _ => None,
        };
        if let Some(l) = eval_before {
            metrics.write(&json!({"step": 0, "eval_loss": l}))?;
        }
        let mut p = self.progress(start_step);
        let mut keep_pages = crate::memory::KeepFreedPages::new();
        for step in start_step..self.total_steps {
            self.one_step(step, &mut p, &mut metrics)?;
            keep_pages.after_step();
        }
        drop(keep_pages);
        p.bar.finish_and_clear();
        self.write_adapter()?;
        let seconds = p.started.elapsed().as_secs_f64();
        let (frozen_weight_bytes, qbytes, qparams) = self.model.frozen_bytes();
        let summary = Summary {
            steps: self.total_steps,
            skipped_steps: self.skipped_steps,
            final_train_loss: p.last_loss,
            eval_loss_before: eval_before,
            eval_loss_after: p.eval_after,
            seconds,
            tokens_per_second: p.tokens as f64 / seconds.max(1e-9),
            output: self.cfg.output.clone(),
            frozen_weight_bytes,
            quantized_bytes_per_param: (qparams > 0).then(|| qbytes as f64 / qparams as f64),
            memory: {
                p.memory.sample();
                p.memory
            },
        };
        if self.is_writer() {
            peft_adapters::fsio::write_atomic(
                &self.cfg.output.join("train_summary.json"),
                serde_json::to_string_pretty(&summary.to_json(self))?.as_bytes(),
            )?;
        }
        Ok(summary)
    }

    /// The step the run starts from: a resumed run's checkpoint, or 0 in an
    /// output folder that holds no run yet (only rank 0's folder matters:
    /// the other ranks never write).
    fn start(&mut self, metrics_path: &Path) -> Result<u64> {
        let (writer, output) = (self.is_writer(), self.cfg.output.clone());
        if self.cfg.resume {
            let s = self.resume()?;
            if writer {
                keep_metrics_until(metrics_path, s)?;
                eprintln!(
                    "resuming from {} at step {s}",
                    output.join(format!("checkpoint-{s}")).display()
                );
            }
            return Ok(s);
        }
        let held = !checkpoint::list(&output).is_empty()
            || output.join("adapter_model.safetensors").exists();
        let fresh = if writer && held {
            Err(anyhow::anyhow!(
                "{}: already holds a run; pass --resume to continue it or choose another --output",
                output.display()
            ))
        } else {
            Ok(())
        };
        agree::fail_together(
            self.group.as_deref(),
            "to start a run in its --output",
            fresh,
        )?;
        if writer {
            let _ = std::fs::remove_file(metrics_path);
            remove_event_files(&output.join("runs"));
        }
        Ok(0)
    }

    /// The settings and the adapter's configuration, written first; the
    /// adapter weights come last, in one rename: a folder holding both files
    /// is a finished adapter, whenever the process is killed.
    fn write_run_files(&self) -> Result<()> {
        if !self.is_writer() {
            return Ok(());
        }
        let output = &self.cfg.output;
        // The settings, and how the run was made (recorded, never read back).
        let mut args = serde_json::to_value(&self.cfg)?;
        args["world_size"] = json!(self.rank_and_world().1);
        peft_adapters::fsio::write_atomic(
            &output.join("training_args.json"),
            serde_json::to_string_pretty(&args)?.as_bytes(),
        )?;
        peft_adapters::fsio::write_atomic(
            &output.join(peft_adapters::lora::files::CONFIG_FILE),
            // As the adapter is saved: PiSSA/OLoRA converted to plain LoRA.
            serde_json::to_string_pretty(&peft_model::saved_config(&self.adapter).to_json())?
                .as_bytes(),
        )
    }

    /// What is trained, on what, how long (rank 0 only).
    fn announce(&self) {
        if !self.is_writer() {
            return;
        }
        let regs = if self.regs.is_empty() {
            String::new()
        } else {
            format!(", regularizers: {}", self.regs.names().join(", "))
        };
        let fp16 = if self.scaler.is_some() {
            ", fp16 with dynamic loss scaling"
        } else {
            ""
        };
        eprintln!("{}", peft_model::trainable_parameters_line(&self.model));
        eprintln!(
            "{} training examples ({}; {} truncated to {} tokens, {} dropped), {} steps of {} x {}{regs}{fp16}",
            self.train.examples.len(),
            self.train.format.name(),
            self.train.truncated,
            self.cfg.max_seq_length,
            self.train.dropped,
            self.total_steps,
            self.cfg.per_device_train_batch_size,
            self.cfg.gradient_accumulation_steps,
        );
    }

    /// The progress of a loop starting at `start_step`: a bar on a terminal,
    /// plain lines otherwise, rank 0 only (every rank prints its errors).
    fn progress(&self, start_step: u64) -> Progress {
        let writer = self.is_writer();
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
        Progress {
            bar,
            plain,
            started: Instant::now(),
            start_step,
            tokens: 0,
            last_loss: f64::NAN,
            eval_after: None,
            memory: crate::memory::MemoryWatch::default(),
        }
    }

    /// Step `step` and what follows it: progress, evaluation and metrics on
    /// schedule, a checkpoint on schedule, and the stop every rank agreed on.
    fn one_step(&mut self, step: u64, p: &mut Progress, metrics: &mut MetricsLog) -> Result<()> {
        let s = self.train_step(step)?;
        p.memory.sample();
        p.tokens += s.tokens;
        p.last_loss = s.loss;
        let done = step + 1;
        let tps = p.tokens as f64 / p.started.elapsed().as_secs_f64().max(1e-9);
        p.bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            s.loss, s.lr, tps
        ));
        p.bar.inc(1);
        p.plain.step(done, self.total_steps, p.start_step, &s, tps);
        let mut line = json!({
            "step": done, "epoch": self.plan.epoch_after(done), "loss": s.loss, "lr": s.lr,
            "grad_norm": s.grad_norm, "tokens_per_second": tps,
        });
        if let Some(aux) = s.router_aux_loss {
            line["router_aux_loss"] = json!(aux);
        }
        if let Some(sc) = &self.scaler {
            line["loss_scale"] = json!(sc.scale());
            line["skipped"] = json!(s.skipped);
        }
        let eval_now = self.cfg.eval_steps > 0 && done.is_multiple_of(self.cfg.eval_steps)
            || done == self.total_steps;
        if eval_now {
            if let Some(l) = self.evaluate()? {
                line["eval_loss"] = json!(l);
                p.eval_after = Some(l);
                p.bar.println(format!("step {done}: eval loss {l:.4}"));
            }
        }
        if done.is_multiple_of(self.cfg.logging_steps) || eval_now {
            metrics.write(&line)?;
        }
        if self.cfg.save_steps > 0
            && done.is_multiple_of(self.cfg.save_steps)
            && done < self.total_steps
        {
            self.save_checkpoint(done)?;
        }
        if let (Some(sig), true) = (s.stop, done < self.total_steps) {
            self.stop_on(sig, done, true)
                .inspect_err(|_| p.bar.abandon())?;
        }
        Ok(())
    }

    /// The adapter's weights, checked finite and written last (rank 0); every
    /// rank leaves together, after they are written.
    fn write_adapter(&mut self) -> Result<()> {
        self.check_finite()?;
        if self.is_writer() {
            let (_, tensors) = peft_model::saved_form(&self.model, DEFAULT_ADAPTER, &self.adapter)?;
            peft_adapters::lora::files::write_safetensors(
                &self
                    .cfg
                    .output
                    .join(peft_adapters::lora::files::WEIGHTS_FILE),
                &tensors,
            )?;
        }
        if let Some(g) = &self.group {
            g.barrier()?;
        }
        Ok(())
    }
}

/// Removes the event files an earlier, unsaved run left in `OUTPUT/runs/`
/// (a fresh run removes its `metrics.jsonl` likewise); other files stay.
fn remove_event_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name
            .to_string_lossy()
            .starts_with(super::tensorboard::EVENTS_PREFIX)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
