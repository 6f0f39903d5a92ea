//! What a run shows and logs: plain progress lines when stderr is not a
//! terminal, and `metrics.jsonl`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use super::StepStats;

/// Progress as plain lines when stderr is not a terminal (nohup, CI, a
/// scheduler), where the bar is hidden: every twentieth of the run and at
/// least once a minute, as transformers' Trainer logs.
pub(crate) struct PlainProgress {
    pub(crate) on: bool,
    every: u64,
    last: Instant,
    started: Instant,
}

impl PlainProgress {
    pub(crate) fn new(steps: u64) -> Self {
        Self {
            on: !std::io::IsTerminal::is_terminal(&std::io::stderr()),
            every: (steps / 20).max(1),
            last: Instant::now(),
            started: Instant::now(),
        }
    }

    pub(crate) fn step(&mut self, done: u64, total: u64, start: u64, s: &StepStats, tps: f64) {
        let due =
            done.is_multiple_of(self.every) || self.last.elapsed().as_secs() >= 60 || done == total;
        if !self.on || !due {
            return;
        }
        self.last = Instant::now();
        let per_step = self.started.elapsed().as_secs_f64() / (done - start).max(1) as f64;
        let eta = (per_step * (total - done) as f64) as u64;
        eprintln!(
            "step {done}/{total}  loss {:.4}  lr {:.2e}  grad norm {:.3}  {:.0} tok/s  eta {}:{:02}:{:02}",
            s.loss,
            s.lr,
            s.grad_norm,
            tps,
            eta / 3600,
            eta / 60 % 60,
            eta % 60
        );
    }
}

/// `metrics.jsonl`, appended line by line and flushed, with errors naming the
/// file; and the same lines as TensorBoard scalars with `--report-to tensorboard`.
pub(crate) struct MetricsLog {
    /// `None` on ranks other than 0, which write nothing.
    file: Option<std::fs::File>,
    path: PathBuf,
    events: Option<super::tensorboard::EventWriter>,
}

impl MetricsLog {
    pub(crate) fn open(path: &Path, writer: bool) -> Result<Self> {
        let file = writer
            .then(|| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("{}: cannot open for writing", path.display()))
            })
            .transpose()?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            events: None,
        })
    }

    /// Also writes every line to a TensorBoard event file in `dir` (rank 0
    /// only), for a run that starts at `start_step`.
    pub(crate) fn with_tensorboard(mut self, dir: &Path, start_step: u64) -> Result<Self> {
        if self.file.is_some() {
            let resumed_at = (start_step > 0).then_some(start_step);
            self.events = Some(super::tensorboard::EventWriter::create(dir, resumed_at)?);
        }
        Ok(self)
    }

    pub(crate) fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        writeln!(file, "{line}")
            .and_then(|()| file.flush())
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        match self.events.as_mut() {
            Some(events) => events.metrics_line(line),
            None => Ok(()),
        }
    }
}

pub(crate) fn keep_metrics_until(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    peft_adapters::lora::files::write_atomic(path, out.as_bytes())
}
