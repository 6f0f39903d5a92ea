//! `peft-rs train`: the settings from defaults, a settings file and the flags
//! typed; a launcher for `--nproc`; the run and its summary.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use crate::train::{TrainConfig, Trainer};

/// `peft-rs train`: the settings of [`TrainConfig`], each a flag, plus a settings file.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML, YAML or JSON file with the settings (field names as in training_args.json, which can
    /// itself be given); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: TrainConfig,
    /// Same as --group-by-length false.
    #[arg(long, hide = true)]
    no_group_by_length: bool,
}

impl TrainArgs {
    /// The settings: defaults, then --config, then the flags given on the
    /// command line (`matches` tells which were given).
    pub fn to_config(&self, matches: &ArgMatches) -> Result<TrainConfig> {
        let file = self
            .config
            .as_deref()
            .map(TrainConfig::from_file)
            .transpose()?;
        let given: Vec<String> = train_setting_args()
            .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
            .collect();
        let mut c = match &file {
            None => self.settings.clone(),
            Some(from_file) => {
                // Field by field, through JSON: only what was typed replaces the file's value.
                let mut merged = serde_json::to_value(from_file)?;
                let flags = serde_json::to_value(&self.settings)?;
                for id in &given {
                    merged[id.as_str()] = flags[id.as_str()].clone();
                }
                serde_json::from_value(merged)?
            }
        };
        if self.no_group_by_length {
            c.group_by_length = false;
        }
        if let Err(e) = c.validate() {
            let value = serde_json::to_value(&c)?[e.field].to_string();
            if given.iter().any(|g| g == e.field) {
                bail!("{} {value}: {}", flag_of(e.field), e.problem);
            }
            match &self.config {
                Some(f) => bail!(
                    "{}: field `{}` = {value}: {}",
                    f.display(),
                    e.field,
                    e.problem
                ),
                None => bail!("{e}"),
            }
        }
        Ok(c)
    }
}

/// The ids (= field names) of the arguments [`TrainConfig`] defines.
fn train_setting_args() -> impl Iterator<Item = String> {
    <TrainConfig as Args>::augment_args(clap::Command::new("train"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect::<Vec<_>>()
        .into_iter()
}

/// `--lr` for `learning_rate`: the flag that sets a [`TrainConfig`] field.
pub fn flag_of(field: &str) -> String {
    <TrainConfig as Args>::augment_args(clap::Command::new("train"))
        .get_arguments()
        .find(|a| a.get_id() == field)
        .and_then(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .unwrap_or_else(|| format!("`{field}`"))
}

/// `peft-rs train`.
pub fn run(
    a: TrainArgs,
    matches: &ArgMatches,
    registry: &crate::regularizers::Registry,
) -> Result<()> {
    let cfg = a.to_config(matches)?;
    let dist = crate::dist::DistEnv::from_env()?;
    let our_worker = std::env::var_os(crate::dist::launch::WORKER_MARK).is_some();
    if let (true, Some(d), false) = (cfg.nproc > 1, &dist, our_worker) {
        bail!(
            "--nproc {} while WORLD_SIZE={} is set: a launcher (torchrun, a scheduler) already started the processes; leave out --nproc",
            cfg.nproc,
            d.world_size
        );
    }
    if cfg.nproc > 1 && dist.is_none() {
        cfg.validate()?;
        return crate::dist::launch_local(cfg.nproc);
    }
    crate::signals::install();
    let tensorboard = cfg.report_to == crate::train::ReportTo::Tensorboard;
    let mut trainer = Trainer::new(cfg, registry)?;
    let s = trainer.run()?;
    if dist.is_some_and(|d| d.rank != 0) {
        return Ok(());
    }
    println!(
        "== training finished: {} steps in {:.1} s ({:.0} tokens/s)",
        s.steps, s.seconds, s.tokens_per_second
    );
    println!("final training loss: {:.4}", s.final_train_loss);
    println!("memory: {}", s.memory);
    if let (Some(b), Some(after)) = (s.eval_loss_before, s.eval_loss_after) {
        println!(
            "eval loss: {b:.4} -> {after:.4} (perplexity {:.2} -> {:.2})",
            b.exp(),
            after.exp()
        );
    } else if let Some(after) = s.eval_loss_after {
        println!("eval loss: {after:.4} (perplexity {:.2})", after.exp());
    }
    println!("adapter (PEFT format): {}", s.output.display());
    println!("metrics: {}", s.output.join("metrics.jsonl").display());
    if tensorboard {
        println!(
            "tensorboard: tensorboard --logdir {}",
            s.output.join("runs").display()
        );
    }
    Ok(())
}
