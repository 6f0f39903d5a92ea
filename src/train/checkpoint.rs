//! Checkpoints that survive being killed at any moment.
//!
//! `OUTPUT/checkpoint-STEP/` holds the adapter (PEFT format), the optimizer
//! moments and a small trainer state. It is written into a hidden temporary
//! directory, completed by a `COMPLETE` manifest of file sizes written last,
//! and renamed into place; resume takes the newest folder whose manifest
//! matches its files and ignores anything else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::Tensor;

use super::{LossScaler, TrainConfig};

use peft_adapters::lora::files::{write_atomic, write_safetensors};

const MANIFEST: &str = "COMPLETE";
/// Optimizer moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Step and settings.
pub const STATE_FILE: &str = "trainer_state.json";

/// What a checkpoint records besides the weights and optimizer moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: u64,
    /// Fractional epoch after those steps.
    pub epoch: f64,
    /// Steps the run plans in total.
    pub total_steps: u64,
    /// Steps skipped because fp16 gradients overflowed.
    pub skipped_steps: u64,
    /// The fp16 loss scaler's state (None unless training in fp16).
    pub loss_scaler: Option<LossScaler>,
    /// The peft-rs version that wrote the checkpoint.
    pub peft_rs_version: String,
    /// Every setting of the run.
    pub settings: TrainConfig,
    /// The processes the run trained with (a run resumes with as many).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

impl TrainerState {
    /// Reads `DIR/trainer_state.json`, naming the file when it is unreadable.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = peft_adapters::fsio::read_regular_string(
            &path,
            peft_adapters::fsio::MAX_JSON_BYTES,
            "trainer state",
        )?;
        let mut value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: not JSON ({e}); the checkpoint is damaged",
                path.display()
            )
        })?;
        // Checkpoints written before the process count left the settings.
        if let Some(n) = value["settings"]
            .as_object_mut()
            .and_then(|s| s.remove("world_size"))
        {
            if value.get("world_size").is_none() {
                value["world_size"] = n;
            }
        }
        serde_json::from_value(value).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a trainer state written by this peft-rs ({e}); the checkpoint is damaged \
                 or from another version: delete that checkpoint folder to resume from an earlier one",
                path.display()
            )
        })
    }
}

/// Writes a checkpoint directory atomically. `write_adapter` writes the
/// adapter files into the directory it is given.
pub fn save(
    output: &Path,
    step: u64,
    optimizer_state: &[(String, Tensor)],
    trainer_state: &TrainerState,
    write_adapter: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = output.join(format!("checkpoint-{step}"));
    let tmp = output.join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let written = write_checkpoint_files(&tmp, optimizer_state, trainer_state, write_adapter);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    crate::outputs::publish_dir(&tmp, &final_dir)?;
    Ok(final_dir)
}

fn write_checkpoint_files(
    tmp: &Path,
    optimizer_state: &[(String, Tensor)],
    trainer_state: &TrainerState,
    write_adapter: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    write_adapter(tmp)?;
    write_safetensors(&tmp.join(OPTIMIZER_FILE), optimizer_state)?;
    write_atomic(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(trainer_state)?.as_bytes(),
    )?;
    let mut sizes = BTreeMap::new();
    for e in std::fs::read_dir(tmp)? {
        let e = e?;
        sizes.insert(
            e.file_name().to_string_lossy().into_owned(),
            e.metadata()?.len(),
        );
    }
    write_atomic(
        &tmp.join(MANIFEST),
        serde_json::to_string_pretty(&json!(sizes))?.as_bytes(),
    )
}

/// Whether a checkpoint folder is complete: its manifest lists every file with its size.
pub fn is_complete(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST)) else {
        return false;
    };
    let Ok(sizes) = serde_json::from_str::<BTreeMap<String, u64>>(&text) else {
        return false;
    };
    !sizes.is_empty()
        && sizes
            .iter()
            .all(|(f, &n)| std::fs::metadata(dir.join(f)).is_ok_and(|m| m.len() == n))
}

/// Complete checkpoints in `output`, oldest first, with their steps.
pub fn list(output: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            is_complete(&e.path()).then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Removes the oldest checkpoints so that at most `keep` remain (0: keep all).
pub fn prune(output: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list(output);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("{}: cannot remove", dir.display()))?;
    }
    Ok(())
}
