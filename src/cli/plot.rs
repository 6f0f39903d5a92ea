//! `peft-rs plot`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
// The flags of `peft-rs plot` (a plain comment: a doc comment would replace the subcommand's help).
#[allow(missing_docs)]
pub struct PlotArgs {
    /// Run directories (each with the metrics.jsonl that `train` writes).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub(crate) runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long, value_name = "FILE.png")]
    pub(crate) output: PathBuf,
    /// Title of the picture.
    #[arg(long, default_value = "LoRA fine-tuning loss")]
    pub(crate) title: String,
    /// Width in pixels (100 to 8192).
    #[arg(long, default_value_t = 1200)]
    pub(crate) width: u32,
    /// Height in pixels (100 to 8192).
    #[arg(long, default_value_t = 700)]
    pub(crate) height: u32,
    /// A logarithmic loss axis (useful when runs start far above where they end).
    #[arg(long)]
    pub(crate) log_y: bool,
    /// Legend labels, one per run, comma-separated (default: the run directories' names).
    #[arg(long, value_delimiter = ',', value_name = "LABEL,LABEL,...")]
    pub(crate) labels: Vec<String>,
}

/// `peft-rs plot`.
pub fn run(a: PlotArgs) -> Result<()> {
    if !a.labels.is_empty() && a.labels.len() != a.runs.len() {
        bail!(
            "--labels has {} labels for {} runs; give one per run",
            a.labels.len(),
            a.runs.len()
        );
    }
    let mut runs = a
        .runs
        .iter()
        .map(|r| crate::plot::read_run(r))
        .collect::<Result<Vec<_>>>()?;
    for (run, label) in runs.iter_mut().zip(&a.labels) {
        run.label.clone_from(label);
    }
    let opts = crate::plot::PlotOptions {
        title: a.title,
        size: (a.width, a.height),
        log_y: a.log_y,
    };
    crate::plot::plot(&runs, &a.output, &opts)?;
    println!("{}", a.output.display());
    Ok(())
}
