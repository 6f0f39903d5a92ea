//! Instruction data: reading Alpaca, chat `messages`, `prompt`/`completion`
//! and plain `text` records ([`formats`]), tokenizing them with the loss on
//! completions only ([`tokenize`]), packing several into a row ([`packing`]),
//! and batching with right padding ([`batch`]).
//!
//! A malformed record is an error naming `file:line` and the field, raised
//! before any training starts: silently skipping records would train on a
//! different dataset than the user believes.

pub mod batch;
pub mod formats;
pub mod packing;
pub mod tokenize;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rayon::prelude::*;

pub use batch::{batch_order, collate, Batch};
pub use formats::{
    alpaca_prompt, generation_cases, parse_records, DataFormat, GenerationCase, MAX_MESSAGES,
    MAX_RECORD_BYTES,
};
pub use packing::pack;

use crate::tokenizer::Tokenizer;
use formats::{at, read_records, resolve_format};
use peft_regularizers::rng::SplitMix64;
use tokenize::{text_budget, tokenize};

/// Label value that takes no loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// How records become examples.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// The format, or `None` to detect it from the first record.
    pub format: Option<DataFormat>,
    /// Longer examples are truncated to their first `max_seq_len` tokens.
    pub max_seq_len: usize,
    /// Take the loss on prompt tokens (and non-assistant turns) too.
    pub train_on_prompt: bool,
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<i64>,
    /// The target at each position ([`IGNORE`] where no loss is taken), the
    /// same length as `input_ids`. Labels are not shifted: the model's
    /// prediction at position i is scored against `labels[i+1]`, so
    /// `labels[0]` never takes a loss.
    pub labels: Vec<i64>,
    /// For a row of packed examples, their lengths in order (empty: one example).
    pub segments: Vec<usize>,
}

impl Example {
    /// One example of `input_ids` and `labels`, with `eos` appended to both
    /// when given (a completion's end, which is learned).
    pub fn ended(mut input_ids: Vec<i64>, mut labels: Vec<i64>, eos: Option<i64>) -> Self {
        if let Some(eos) = eos {
            input_ids.push(eos);
            labels.push(eos);
        }
        Self {
            input_ids,
            labels,
            segments: vec![],
        }
    }

    /// Positions that take a loss (`labels[1..]` that are not [`IGNORE`]).
    pub fn num_label_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// A tokenized data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its record format (given or detected).
    pub format: DataFormat,
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples left with no label token after truncation (not kept).
    pub dropped: usize,
}

impl Dataset {
    /// A digest of the tokenized examples (ids, labels, packing), with which
    /// ranks check that they read the same data: FNV-1a over every value.
    pub fn digest(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for e in &self.examples {
            eat(e.input_ids.len() as u64);
            e.input_ids.iter().for_each(|&t| eat(t as u64));
            e.labels.iter().for_each(|&t| eat(t as u64));
            e.segments.iter().for_each(|&t| eat(t as u64));
        }
        h
    }
}

/// Reads and tokenizes a data file: a JSON array or JSONL (one object a
/// line). A malformed record stops everything with its file, line and field
/// named; examples keep the file order. `eos_token_id` ends completions and
/// texts (`tokenizer.eos_token`, see [`crate::models::Pretrained::completion_eos`]);
/// chats end with what their template writes.
pub fn load_dataset(
    path: &Path,
    tok: &Tokenizer,
    eos_token_id: i64,
    opts: &DataOptions,
) -> Result<Dataset> {
    let records = read_records(path)?;
    let format = resolve_format(path, &records, opts.format)?;
    let budget = text_budget(tok, opts.max_seq_len);
    // Tokenizing dominates loading; rayon keeps the output in file order.
    let tokenized: Vec<Result<Example>> = records
        .par_iter()
        .map(|(line, rec)| {
            tokenize(rec, format, tok, eos_token_id, opts, budget).map_err(|e| at(path, *line, e))
        })
        .collect();
    let mut examples = Vec::with_capacity(tokenized.len());
    let (mut truncated, mut dropped) = (0, 0);
    // The first bad record in file order is the one reported.
    for ex in tokenized {
        let mut ex = ex?;
        if ex.input_ids.len() > opts.max_seq_len {
            ex.input_ids.truncate(opts.max_seq_len);
            ex.labels.truncate(opts.max_seq_len);
            truncated += 1;
        }
        if ex.num_label_tokens() == 0 {
            dropped += 1;
            continue;
        }
        examples.push(ex);
    }
    if examples.is_empty() {
        bail!(
            "{}: no example has a token to learn from: all {} records were dropped because \
             nothing but prompt tokens fits in max_seq_len {}; raise --max-seq-len or shorten the prompts",
            path.display(),
            records.len(),
            opts.max_seq_len
        );
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        format,
        examples,
        truncated,
        dropped,
    })
}

/// Splits off `n` examples, chosen by `seed`, as a held-out evaluation set
/// (returned second); both keep the file order. The held-out set reports no
/// truncated or dropped examples: those counts belong to the file.
pub fn split_holdout(mut ds: Dataset, n: usize, seed: u64) -> (Dataset, Dataset) {
    let mut idx: Vec<usize> = (0..ds.examples.len()).collect();
    SplitMix64::new(seed ^ 0x5EED).shuffle(&mut idx);
    let mut held = vec![false; ds.examples.len()];
    for &i in idx.iter().take(n) {
        held[i] = true;
    }
    let all = std::mem::take(&mut ds.examples);
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (e, h) in all.into_iter().zip(held) {
        if h {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    let eval_ds = Dataset {
        path: ds.path.clone(),
        format: ds.format,
        examples: eval,
        truncated: 0,
        dropped: 0,
    };
    ds.examples = train;
    (ds, eval_ds)
}
