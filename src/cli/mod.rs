//! The `peft-rs` command line: one file per subcommand, each reading its
//! flags and calling the library; [`args`] holds the flags several share.

pub mod args;
pub mod env;
pub mod eval;
pub mod export;
pub mod generate;
pub mod merge;
pub mod plot;
pub mod train;

use anyhow::{bail, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub use args::{AdapterArgs, ModelArgs};
pub use train::{flag_of, TrainArgs};

/// Train, load, save and merge LoRA/PEFT adapters for causal language models.
#[derive(Parser, Debug)]
#[command(name = "peft-rs", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the libtorch build, the devices it sees and whether CUDA is usable.
    Env,
    /// Generate text from a base model, with or without adapters (greedy unless --temperature > 0).
    #[command(allow_negative_numbers = true, args_override_self = true)]
    Generate(generate::GenerateArgs),
    /// Merge adapters into the base weights and write a Hugging Face model directory.
    #[command(args_override_self = true)]
    Merge(merge::MergeArgs),
    /// Fine-tune LoRA adapters on instruction data (NEFTune with --neftune-alpha).
    #[command(allow_negative_numbers = true, args_override_self = true)]
    Train(Box<train::TrainArgs>),
    /// Print the loss and perplexity of a model (with or without adapters) on a data file.
    #[command(allow_negative_numbers = true, args_override_self = true)]
    Eval(eval::EvalArgs),
    /// Export a model or an adapter for other runtimes (GGUF for llama.cpp and Ollama).
    Export(export::ExportArgs),
    /// Draw training and evaluation loss against step for one or more runs into a PNG.
    Plot(plot::PlotArgs),
}

/// Runs the command line with the regularizers of `registry` and exits:
/// 0 on success, 128 + the signal when a signal stopped the work, 1 on any
/// other error, which ends as one line on stderr — libtorch failures (an
/// allocation that does not fit, say) included, which tch reports by
/// panicking.
pub fn exit_with(registry: &crate::regularizers::Registry) -> ! {
    // A panic prints nothing itself; it is reported below as one line.
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| main_with(registry)));
    crate::memory::release_freed_memory();
    let payload = match result {
        Ok(Ok(())) => std::process::exit(0),
        Ok(Err(e)) => {
            // `{:#}` joins the context chain on one line: "what: why: cause".
            eprintln!("error: {e:#}");
            // Stopped by a signal: the shell's convention, 128 + the signal.
            let code = e
                .downcast_ref::<crate::signals::Interrupted>()
                .map_or(1, |i| 128 + i.signal);
            std::process::exit(code);
        }
        Err(payload) => payload,
    };
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    eprintln!("error: {}", describe_panic(text));
    std::process::exit(1)
}

/// Parses the command line and runs it, with the regularizers of
/// `registry` (a program built on peft-rs registers its own there, and its
/// `--regularizer` flags and settings files can then name them).
pub fn main_with(registry: &crate::regularizers::Registry) -> Result<()> {
    crate::signals::ignore_file_size_limit();
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => usage_error(e)?,
    };
    let cli = Cli::from_arg_matches(&matches).or_else(usage_error)?;
    match cli.command {
        Command::Env => env::run(),
        Command::Generate(a) => generate::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Train(a) => train::run(
            *a,
            matches
                .subcommand_matches("train")
                .expect("the train subcommand was parsed"),
            registry,
        ),
        Command::Eval(a) => eval::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Export(a) => export::run(a),
    }
}

/// Help and version print as clap prints them; a usage error becomes one
/// line (clap's message with its hint, without the usage block).
fn usage_error<T>(e: clap::Error) -> Result<T> {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let line = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect::<Vec<_>>()
        .join(" ");
    bail!("{}", line.strip_prefix("error: ").unwrap_or(&line))
}

/// One line for a panic: libtorch's own message when tch panicked with one
/// (`Torch("... not enough memory: you tried to allocate ...\nException raised from ...")`),
/// otherwise an internal error to report.
pub fn describe_panic(text: &str) -> String {
    if let Some(start) = text.find("Torch(") {
        let msg = text[start + 6..]
            .trim_start_matches("TchError(")
            .trim_start_matches('"');
        let first = msg
            .split("\\n")
            .next()
            .unwrap_or(msg)
            .trim_end_matches(['"', ')']);
        return format!("libtorch: {first}");
    }
    format!(
        "internal error (please report it): {}",
        text.lines().next().unwrap_or(text)
    )
}
