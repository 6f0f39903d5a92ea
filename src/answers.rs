//! Statistics of generated answers, to compare adapters by what they write:
//! length, diversity, repetition, truncation, and overlap with reference
//! answers (the NEFTune paper's measures of length and of overfitting).
//!
//! Words are whitespace-separated, as the paper counts them.
//!
//! [`answer_report`] answers every prompt of a data file greedily and
//! scores the answers (`peft-rs eval --exact-match`).

use std::collections::HashSet;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

/// One generated answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The decoded text.
    pub text: String,
    /// New tokens generated (the end-of-sequence token included when reached).
    pub tokens: usize,
    /// Whether generation stopped at the token limit rather than at an EOS.
    pub hit_limit: bool,
}

/// Summary statistics of a set of answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnswerStats {
    /// Number of answers.
    pub answers: usize,
    /// Mean length in tokens.
    pub mean_tokens: f64,
    /// Mean length in characters.
    pub mean_chars: f64,
    /// Mean length in words.
    pub mean_words: f64,
    /// Distinct word bigrams over all bigrams of all answers (corpus distinct-2).
    pub distinct_2: f64,
    /// Mean over answers of the share of word bigrams that repeat an earlier
    /// bigram of the same answer (0: no repetition).
    pub repetition_2: f64,
    /// Share of answers that hit the token limit.
    pub truncated: f64,
}

fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// Distinct n-grams over all n-grams, pooled over `texts` (1.0 when there are none).
pub fn distinct_n(texts: &[&str], n: usize) -> f64 {
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for t in texts {
        let w = words(t);
        for g in w.windows(n) {
            seen.insert(g.to_vec());
            total += 1;
        }
    }
    if total == 0 {
        1.0
    } else {
        seen.len() as f64 / total as f64
    }
}

/// The share of `text`'s word n-grams that already occurred earlier in it.
pub fn repetition_n(text: &str, n: usize) -> f64 {
    let w = words(text);
    let mut seen = HashSet::new();
    let (mut total, mut repeated) = (0usize, 0usize);
    for g in w.windows(n) {
        total += 1;
        if !seen.insert(g) {
            repeated += 1;
        }
    }
    if total == 0 {
        0.0
    } else {
        repeated as f64 / total as f64
    }
}

/// Words as the `rouge-score` package tokenizes them (what the NEFTune paper
/// used): lower-cased, with every character that is not a letter or digit
/// treated as a space, so "No," matches "no". Unlike `rouge-score`, non-ASCII
/// letters are kept instead of dropped.
fn rouge_words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// ROUGE-L F1 between a candidate and a reference: the longest common
/// subsequence of their words, as precision and recall, combined as the
/// harmonic mean (Lin 2004, β = 1).
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (rouge_words(candidate), rouge_words(reference));
    if c.is_empty() || r.is_empty() {
        return 0.0;
    }
    // One row of the LCS table at a time.
    let mut prev = vec![0usize; r.len() + 1];
    let mut cur = vec![0usize; r.len() + 1];
    for cw in &c {
        for (j, rw) in r.iter().enumerate() {
            cur[j + 1] = if cw == rw {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let lcs = prev[r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (p, rec) = (lcs / c.len() as f64, lcs / r.len() as f64);
    2.0 * p * rec / (p + rec)
}

/// The statistics of `answers`.
pub fn stats(answers: &[Answer]) -> AnswerStats {
    let n = answers.len().max(1) as f64;
    let texts: Vec<&str> = answers.iter().map(|a| a.text.as_str()).collect();
    AnswerStats {
        answers: answers.len(),
        mean_tokens: answers.iter().map(|a| a.tokens as f64).sum::<f64>() / n,
        mean_chars: answers
            .iter()
            .map(|a| a.text.chars().count() as f64)
            .sum::<f64>()
            / n,
        mean_words: answers
            .iter()
            .map(|a| words(&a.text).len() as f64)
            .sum::<f64>()
            / n,
        distinct_2: distinct_n(&texts, 2),
        repetition_2: answers
            .iter()
            .map(|a| repetition_n(&a.text, 2))
            .sum::<f64>()
            / n,
        truncated: answers.iter().filter(|a| a.hit_limit).count() as f64 / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(text: &str, tokens: usize, hit_limit: bool) -> Answer {
        Answer {
            text: text.into(),
            tokens,
            hit_limit,
        }
    }

    #[test]
    fn distinct_2_pools_bigrams_over_answers() {
        // "the cat sat" -> (the cat), (cat sat); "the cat ran" -> (the cat), (cat ran):
        // 3 distinct of 4.
        assert_eq!(distinct_n(&["the cat sat", "the cat ran"], 2), 0.75);
        assert_eq!(distinct_n(&["a b c d"], 2), 1.0);
        assert_eq!(distinct_n(&["word"], 2), 1.0, "no bigram at all");
        assert_eq!(distinct_n(&["x x x x x"], 2), 0.25);
    }

    #[test]
    fn repetition_counts_bigrams_seen_before_in_the_same_answer() {
        // Bigrams: (a b) (b a) (a b) (b a): the last two repeat.
        assert_eq!(repetition_n("a b a b a", 2), 0.5);
        assert_eq!(repetition_n("one two three four", 2), 0.0);
        assert_eq!(repetition_n("", 2), 0.0);
        assert_eq!(repetition_n("x x x x", 2), 2.0 / 3.0);
    }

    #[test]
    fn rouge_l_is_the_f1_of_the_longest_common_subsequence() {
        assert_eq!(
            rouge_l("the cat sat on the mat", "the cat sat on the mat"),
            1.0
        );
        assert_eq!(
            rouge_l("completely different words", "nothing shared here"),
            0.0
        );
        // LCS of "police killed the gunman" and "police kill the gunman" is
        // "police the gunman" (3): P = R = 3/4.
        assert!(
            (rouge_l("police kill the gunman", "police killed the gunman") - 0.75).abs() < 1e-12
        );
        // Candidate "a b" against "a x b y": LCS 2, P = 1, R = 0.5, F = 2/3.
        assert!((rouge_l("a b", "a x b y") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(rouge_l("", "a"), 0.0);
        // Case and punctuation do not separate words, as in rouge-score.
        assert!((rouge_l("No, sentence one is", "no") - 0.4).abs() < 1e-12);
        assert_eq!(rouge_l("E, G, B.", "e g b"), 1.0);
        assert_eq!(rouge_l("...", "a"), 0.0);
    }

    #[test]
    fn stats_average_lengths_and_count_truncation() {
        let s = stats(&[a("one two three", 4, false), a("x x x x x", 10, true)]);
        assert_eq!(s.answers, 2);
        assert_eq!(s.mean_tokens, 7.0);
        assert_eq!(s.mean_chars, (13.0 + 9.0) / 2.0);
        assert_eq!(s.mean_words, 4.0);
        assert_eq!(s.truncated, 0.5);
        // Bigrams: (one two) (two three) + four of (x x): 3 distinct of 6.
        assert_eq!(s.distinct_2, 0.5);
        assert_eq!(s.repetition_2, (0.0 + 0.75) / 2.0);
    }
}

/// What `eval --exact-match` measures from greedy answers.
#[derive(Debug, serde::Serialize)]
pub struct AnswerReport {
    /// Share of answers equal to the reference (whitespace-trimmed).
    pub exact_match: f64,
    /// Mean ROUGE-L F1 of the answers against the references.
    pub rouge_l: f64,
    /// Length, diversity, repetition and truncation of the answers.
    #[serde(flatten)]
    pub stats: AnswerStats,
    /// Seconds spent generating.
    pub seconds: f64,
    /// Prompts answered per second.
    pub prompts_per_second: f64,
}

/// Greedy answers to every prompt of a data file, batched, scored against the
/// references and described by their statistics; `show` pairs are printed.
pub fn answer_report(
    base: &crate::models::Pretrained,
    data: &Path,
    format: Option<crate::data::DataFormat>,
    show: usize,
    batch_size: usize,
    max_new_tokens: Option<usize>,
) -> Result<(AnswerReport, Vec<serde_json::Value>)> {
    let cases = crate::data::generation_cases(data, &base.tokenizer, format)?;
    // Without a fixed limit, room for the reference and 16 tokens more.
    let mut limits: Vec<usize> = cases
        .iter()
        .map(|c| match max_new_tokens {
            Some(n) => Ok(n),
            None => Ok((base.tokenizer.encode(&c.reference, false)?.len() + 16).min(512)),
        })
        .collect::<Result<_>>()?;
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let positions = base.model.config.max_position_embeddings;
    let capped = crate::generate::fit_positions(&prompts, &mut limits, positions)?;
    if let Some(n) = max_new_tokens {
        crate::generate::note_capped(capped, n, positions);
    }
    let cfg = crate::generate::GenerationConfig {
        max_new_tokens: limits.iter().copied().max().unwrap_or(1),
        eos_token_ids: base.eos_token_ids.clone(),
        ..crate::generate::GenerationConfig::default()
    };
    let bar = crate::progress::bar(cases.len() as u64, "generating");
    let (mut hits, mut rouge) = (0usize, 0.0);
    let mut answers = Vec::with_capacity(cases.len());
    let mut records = Vec::with_capacity(cases.len());
    let start = std::time::Instant::now();
    crate::generate::generate_in_batches(
        &base.model,
        &prompts,
        &limits,
        &cfg,
        batch_size,
        |i, new| {
            let ended = new.last().is_some_and(|t| cfg.eos_token_ids.contains(t));
            let ids: Vec<u32> = new.iter().map(|&t| t as u32).collect();
            let text = base.tokenizer.decode(&ids, true)?;
            let reference = cases[i].reference.trim();
            let hit = text.trim() == reference;
            hits += hit as usize;
            rouge += rouge_l(text.trim(), reference);
            if i < show {
                // Printed directly: indicatif drops println while its bar is hidden (no terminal).
                eprintln!(
                    "{} {:?} (reference {:?})",
                    if hit { "✓" } else { "✗" },
                    text.trim(),
                    reference
                );
            }
            records.push(
                serde_json::json!({"index": i, "answer": text, "reference": reference,
            "tokens": new.len(), "hit_limit": !ended && new.len() >= limits[i]}),
            );
            answers.push(Answer {
                tokens: new.len(),
                hit_limit: !ended && new.len() >= limits[i],
                text,
            });
            bar.inc(1);
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let n = cases.len().max(1) as f64;
    Ok((
        AnswerReport {
            exact_match: hits as f64 / n,
            rouge_l: rouge / n,
            stats: stats(&answers),
            seconds,
            prompts_per_second: cases.len() as f64 / seconds.max(1e-9),
        },
        records,
    ))
}
