//! Checkpoints of a run in progress: saving one, stopping on a signal every
//! rank agreed on (with a checkpoint), and resuming from rank 0's newest.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::{checkpoint, optim};
use super::{LossScaler, Trainer, TrainerState};
use crate::dist::agree;
use crate::dist::zero::OptimizerShards;
use crate::peft_model::{self, DEFAULT_ADAPTER};
use crate::signals::{self, Interrupted};

/// What rank 0 tells the other ranks when it resumes (the tensors travel
/// by all-reduce).
#[derive(serde::Serialize, serde::Deserialize)]
struct Resumed {
    step: u64,
    optimizer_step: u64,
    skipped_steps: u64,
    loss_scaler: Option<LossScaler>,
}

/// How long rank 0 waits on a stop for the other ranks to read where the
/// checkpoint went, before it exits and takes the rendezvous store with it.
const STOP_LINGER: std::time::Duration = std::time::Duration::from_secs(20);

impl Trainer {
    /// The state saved with a checkpoint after `step` steps.
    pub fn state(&self, step: u64) -> TrainerState {
        TrainerState {
            global_step: step,
            epoch: self.plan.epoch_after(step),
            total_steps: self.total_steps,
            skipped_steps: self.skipped_steps,
            loss_scaler: self.scaler.clone(),
            peft_rs_version: env!("CARGO_PKG_VERSION").to_owned(),
            settings: self.cfg.clone(),
            world_size: self.rank_and_world().1,
        }
    }

    /// Saves a checkpoint after `step` steps (rank 0 writes it; every rank
    /// takes part, as a sharded optimizer state travels to rank 0).
    pub(crate) fn save_checkpoint(&mut self, step: u64) -> Result<PathBuf> {
        let optim = self.optimizer_state()?;
        self.write_checkpoint(step, &optim)
    }

    /// The whole optimizer state, on rank 0 (with a sharded state every
    /// rank must call this; the others get nothing).
    fn optimizer_state(&self) -> Result<Vec<(String, Tensor)>> {
        match (&self.optim_shards, self.group.as_deref()) {
            (Some(z), Some(g)) => z.gather_state(g, &self.optim, &self.params),
            _ => Ok(self.optim.state()),
        }
    }

    fn write_checkpoint(&mut self, step: u64, optim: &[(String, Tensor)]) -> Result<PathBuf> {
        self.check_finite()?;
        if !self.is_writer() {
            return Ok(self.cfg.output.join(format!("checkpoint-{step}")));
        }
        let state = self.state(step);
        let output = self.cfg.output.clone();
        let model = &mut self.model;
        let adapter = &self.adapter;
        let dir = checkpoint::save(&output, step, optim, &state, |d| {
            peft_model::save_adapter_of(model, DEFAULT_ADAPTER, adapter, d)
        })?;
        checkpoint::prune(&output, self.cfg.save_total_limit)?;
        Ok(dir)
    }

    /// Stops the run on `sig`, which every rank agreed on: after `step`
    /// steps rank 0 saves a checkpoint (unless the newest is already that
    /// step's) and every rank waits for it and fails if it failed; with no
    /// step done there is nothing to save. Returns the [`Interrupted`] error
    /// every rank exits with (128 + the signal).
    pub(crate) fn stop_on(&mut self, sig: i32, step: u64, save: bool) -> Result<()> {
        let name = signals::name(sig);
        if !save {
            return Err(Interrupted {
                signal: sig,
                message: format!("stopped by {name} before the first step; nothing to save"),
            }
            .into());
        }
        // Gathered on every rank: only rank 0 knows whether it saved this step already.
        let saved = self.optimizer_state().and_then(|optim| {
            if !self.is_writer() {
                return Ok(PathBuf::new());
            }
            match checkpoint::list(&self.cfg.output).last() {
                Some((s, d)) if *s == step => Ok(d.clone()),
                _ => self.write_checkpoint(step, &optim),
            }
        });
        let dir = agree::fail_together(self.group.as_deref(), "to save the checkpoint", saved)?;
        let message = match &self.group {
            Some(g) if g.rank() != 0 => {
                let dir =
                    agree::share_from_rank0_before_exit(g, "stop-checkpoint", &[], STOP_LINGER)?;
                format!(
                    "rank {}: stopped by {name} after step {step} with every rank; rank 0 saved {}",
                    g.rank(),
                    String::from_utf8_lossy(&dir)
                )
            }
            group => {
                if let Some(g) = group {
                    agree::share_from_rank0_before_exit(
                        g,
                        "stop-checkpoint",
                        dir.display().to_string().as_bytes(),
                        STOP_LINGER,
                    )?;
                }
                format!(
                    "stopped by {name} after step {step} of {}; saved {} — to continue, run the same command with --resume",
                    self.total_steps,
                    dir.display()
                )
            }
        };
        Err(Interrupted {
            signal: sig,
            message,
        }
        .into())
    }

    /// Continues from rank 0's newest complete checkpoint; returns the step
    /// to continue from. Rank 0 reads it and checks it against these
    /// settings; the other ranks take what rank 0 read (their own --output
    /// may hold another checkpoint, or none), so that every rank resumes
    /// from the same one. When rank 0 cannot, every rank fails with it.
    pub(crate) fn resume(&mut self) -> Result<u64> {
        let local = if self.is_writer() {
            self.load_newest_checkpoint()
        } else {
            Ok((0, BTreeMap::new()))
        };
        let (step, optim) = agree::fail_together(self.group.as_deref(), "to resume", local)?;
        let Some(g) = self.group.clone() else {
            self.optim.load_state(optim)?;
            return Ok(step);
        };
        if g.rank() == 0 {
            self.optim.step = optim::state_step(&optim);
        }
        let mine = Resumed {
            step,
            optimizer_step: self.optim.step,
            skipped_steps: self.skipped_steps,
            loss_scaler: self.scaler.clone(),
        };
        let theirs: Resumed = serde_json::from_slice(&agree::share_from_rank0(
            &g,
            "resume",
            &serde_json::to_vec(&mine)?,
        )?)?;
        self.optim.step = theirs.optimizer_step;
        self.skipped_steps = theirs.skipped_steps;
        self.scaler = theirs.loss_scaler;
        let params: Vec<Tensor> = self.params.values().map(Tensor::shallow_clone).collect();
        agree::broadcast_tensors(&g, &params)?;
        // Each moment from rank 0 to the ranks that keep it (every rank, unless sharded).
        OptimizerShards::scatter_state(&g, &optim, &self.optim, &self.params)?;
        Ok(theirs.step)
    }

    /// Loads the newest complete checkpoint of this rank's --output into
    /// the adapter; returns its step and its optimizer state, checked
    /// against the adapter.
    fn load_newest_checkpoint(&mut self) -> Result<(u64, BTreeMap<String, Tensor>)> {
        let Some((step, dir)) = checkpoint::list(&self.cfg.output).pop() else {
            bail!(
                "--resume: no complete checkpoint in {}",
                self.cfg.output.display()
            );
        };
        let state = TrainerState::read(&dir)?;
        let world = self.rank_and_world().1;
        let mut diffs: Vec<String> = self
            .cfg
            .differences_from(&state.settings)
            .iter()
            .map(|d| format!("{} (saved {}, now {})", d.field, d.saved, d.now))
            .collect();
        // The batches and the data each rank reads depend on the process count.
        if state.world_size != world {
            diffs.push(format!(
                "world_size (saved {}, now {world}: start as many processes, e.g. --nproc {})",
                state.world_size, state.world_size
            ));
        }
        if !diffs.is_empty() {
            bail!(
                "--resume: {} from the run saved in {}: {}; resume with the same settings, or start a new run in another --output",
                if diffs.len() == 1 { "this setting differs" } else { "these settings differ" },
                dir.display(),
                diffs.join(", ")
            );
        }
        if state.total_steps != self.total_steps {
            bail!(
                "--resume: the run saved in {} plans {} steps, these settings and data give {}; \
                 the training data changed",
                dir.display(),
                state.total_steps,
                self.total_steps
            );
        }
        let adapter = peft_adapters::lora::files::read_weights(&dir)?;
        tch::no_grad(|| -> Result<()> {
            for (k, p) in &self.params {
                let t = adapter
                    .get(k)
                    .with_context(|| format!("{}: checkpoint lacks {k}", dir.display()))?;
                p.shallow_clone().copy_(&trained_part(t, p));
            }
            Ok(())
        })?;
        let optim = Tensor::read_safetensors(dir.join(checkpoint::OPTIMIZER_FILE))
            .with_context(|| format!("{}: cannot read optimizer state", dir.display()))?;
        let optim: BTreeMap<String, Tensor> = optim.into_iter().collect();
        optim::check_state(&optim, &self.params)
            .with_context(|| format!("{}", dir.join(checkpoint::OPTIMIZER_FILE).display()))?;
        self.skipped_steps = state.skipped_steps;
        if self.scaler.is_some() {
            self.scaler = state.loss_scaler;
        }
        Ok((step, optim))
    }
}

/// The part of saved tensor `t` that parameter `p` holds: all of it, or,
/// for a PiSSA/OLoRA adapter saved converted ([`peft_model::saved_form`]),
/// the trained half (the first rows of A, the first columns of B; the rest
/// is the initial adapter, which resuming makes again from the seed).
fn trained_part(t: &Tensor, p: &Tensor) -> Tensor {
    let (ts, ps) = (t.size(), p.size());
    match (0..ts.len()).find(|&d| ts.len() == ps.len() && ts[d] == 2 * ps[d]) {
        Some(d) => t.narrow(d as i64, 0, ps[d]),
        None => t.shallow_clone(),
    }
}
