//! `peft-rs merge`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::AdapterArgs;
use crate::device::{resolve_model_dir, DtypeArg};
use crate::merge::{merge_to_dir, MergeOptions};

#[derive(Args, Debug)]
// The flags of `peft-rs merge` (a plain comment: a doc comment would replace the subcommand's help).
#[allow(missing_docs)]
pub struct MergeArgs {
    /// Base model directory or Hub id (defaults to the embedded default model).
    #[arg(long, value_name = "DIR|ID")]
    pub(crate) model: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) adapters: AdapterArgs,
    /// Output model directory (written to a temporary directory, then renamed).
    #[arg(long, value_name = "DIR")]
    pub(crate) output: PathBuf,
    /// dtype of the written weights: fp32, bf16 or fp16 (default, or auto: as in the base).
    #[arg(long, value_enum)]
    pub(crate) dtype: Option<DtypeArg>,
    /// Replace --output if it exists.
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// After merging, compare the merged model's logits with the base + adapters' on N
    /// built-in prompts (both in fp32; both models are held in memory) and print the
    /// largest difference.
    #[arg(long, value_name = "N")]
    pub(crate) verify: Option<usize>,
}

/// `peft-rs merge`.
pub fn run(a: MergeArgs) -> Result<()> {
    crate::signals::install();
    let dtype = a
        .dtype
        .filter(|d| *d != DtypeArg::Auto)
        .map(|d| d.resolve(tch::Device::Cpu));
    let opts = MergeOptions {
        base: resolve_model_dir(a.model)?,
        adapters: a.adapters.dirs()?,
        weights: a.adapters.weights,
        output: a.output,
        dtype,
        overwrite: a.overwrite,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    if let Some(n) = a.verify {
        // Checked before the merge, so that a bad count costs nothing.
        if n == 0 || n > 16 {
            anyhow::bail!("--verify {n}: give a number of prompts from 1 to 16");
        }
    }
    let r = merge_to_dir(&opts)?;
    eprintln!(
        "merged {} adapter(s) into {} of {} tensors ({:.1} MB, largest tensor {:.1} MB) in {:.1} s",
        opts.adapters.len(),
        r.tensors_merged,
        r.tensors_written,
        r.bytes_written as f64 / 1e6,
        r.largest_tensor_bytes as f64 / 1e6,
        r.seconds
    );
    let mut memory = crate::memory::MemoryWatch::default();
    memory.sample();
    eprintln!("memory: {memory}");
    if let Some(n) = a.verify {
        let v = crate::merge::verify(&opts.base, &opts.adapters, &opts.weights, &opts.output, n)?;
        eprintln!(
            "verify: {} prompts, {} positions: largest logit difference {:.3e} (largest |logit| {:.1}); same next token at {}/{} positions",
            v.prompts, v.positions, v.max_abs_diff, v.max_abs_logit, v.same_argmax, v.positions
        );
    }
    println!("{}", opts.output.display());
    Ok(())
}
