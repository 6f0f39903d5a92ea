//! Text generation with a KV cache: greedy by default, or temperature and
//! nucleus (top-p) sampling from a seeded generator.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::models::{AttentionLayout, DecoderInput};
use crate::models::{KvCache, LlamaForCausalLM};
use crate::tokenizer::{Message, Tokenizer};
use peft_regularizers::hooks::NoHooks;
use peft_regularizers::rng::SplitMix64;

/// The most new tokens one prompt may ask for.
pub const MAX_NEW_TOKENS: usize = 1 << 20;

/// The smallest sampling temperature: below it sampling is greedy decoding
/// in effect, and near 1e-38 `logits / T` overflows to infinities, whose
/// softmax is NaN (transformers fails there too). 0 asks for greedy decoding.
pub const MIN_TEMPERATURE: f64 = 1e-4;

/// How tokens are chosen.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// transformers' `repetition_penalty`: logits of tokens already present
    /// are divided by it (multiplied when negative). 1.0 is off.
    pub repetition_penalty: f64,
    /// Seed of the sampling generator.
    pub seed: u64,
    /// Tokens that end generation (they are kept in the output ids).
    pub eos_token_ids: Vec<i64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
            eos_token_ids: vec![],
        }
    }
}

impl GenerationConfig {
    /// Rejects settings that have no meaning.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "--temperature must be >= 0 (0 is greedy), got {}",
                self.temperature
            );
        }
        if self.temperature > 0.0 && self.temperature < MIN_TEMPERATURE {
            bail!(
                "--temperature {}: below {MIN_TEMPERATURE} sampling is greedy decoding in effect and the \
                 scaled logits overflow; use --temperature 0 for greedy decoding",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if self.max_new_tokens > MAX_NEW_TOKENS {
            bail!(
                "--max-new-tokens {} is above {MAX_NEW_TOKENS}",
                self.max_new_tokens
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!(
                "--repetition-penalty must be > 0 (1 is off), got {}",
                self.repetition_penalty
            );
        }
        Ok(())
    }
}

/// Caps each prompt's new-token limit so that prompt and answer fit the
/// model's `positions` (`max_position_embeddings`; `None`: no cap) and
/// returns how many limits were lowered. A prompt that alone fills them is
/// an error naming it.
pub fn fit_positions(
    prompts: &[Vec<u32>],
    limits: &mut [usize],
    positions: Option<usize>,
) -> Result<usize> {
    let Some(positions) = positions else {
        return Ok(0);
    };
    let mut capped = 0;
    for (i, (p, limit)) in prompts.iter().zip(limits.iter_mut()).enumerate() {
        if p.len() >= positions {
            bail!(
                "prompt {} has {} tokens, but the model has {positions} positions (max_position_embeddings): shorten it",
                i + 1,
                p.len()
            );
        }
        let room = positions - p.len();
        if *limit > room {
            *limit = room;
            capped += 1;
        }
    }
    Ok(capped)
}

/// One request to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A plain prompt, tokenized as `tokenizer(text)`.
    Plain(String),
    /// A chat, rendered with the model's chat template and a generation prompt.
    Chat(Vec<Message>),
}

impl Request {
    /// The prompt's token ids, and the text that names it in the output
    /// (the prompt, or the chat's last message).
    pub fn encode(&self, tok: &Tokenizer) -> Result<(Vec<u32>, String)> {
        Ok(match self {
            Request::Plain(p) => (tok.encode(p, true)?, p.clone()),
            Request::Chat(m) => (
                tok.encode_chat(m, true)?,
                m.last().map(|m| m.content.clone()).unwrap_or_default(),
            ),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    prompt: Option<String>,
    chat: Option<String>,
    messages: Option<Vec<Message>>,
}

/// The prompts of a file: one plain prompt per line, or (`.jsonl`) one
/// object a line with `prompt`, `chat` (one user message) or `messages`.
pub fn read_prompts(file: &Path) -> Result<Vec<Request>> {
    let text = peft_adapters::fsio::read_regular_string(file, 1 << 30, "prompts file")?;
    let jsonl = file.extension().is_some_and(|e| e == "jsonl");
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !jsonl {
            out.push(Request::Plain(line.to_owned()));
            continue;
        }
        let where_ = || format!("{}:{}", file.display(), n + 1);
        let p: PromptLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: expected {{\"prompt\"|\"chat\"|\"messages\": ...}}",
                where_()
            )
        })?;
        out.push(match (p.prompt, p.chat, p.messages) {
            (Some(t), None, None) => Request::Plain(t),
            (None, Some(t), None) => Request::Chat(vec![Message::user(t)]),
            (None, None, Some(m)) if !m.is_empty() => Request::Chat(m),
            _ => bail!(
                "{}: give exactly one of \"prompt\", \"chat\" or a non-empty \"messages\"",
                where_()
            ),
        });
    }
    if out.is_empty() {
        bail!("{}: no prompts in the file", file.display());
    }
    Ok(out)
}

/// Says once that some answers were capped to fit the model's positions.
pub fn note_capped(capped: usize, asked: usize, positions: Option<usize>) {
    if capped > 0 {
        eprintln!(
            "note: --max-new-tokens {asked} capped for {capped} prompt(s) so that prompt and answer fit the model's {} positions (max_position_embeddings)",
            positions.unwrap_or(0)
        );
    }
}

/// Generates a continuation of one prompt and returns the new token ids.
pub fn generate(
    model: &LlamaForCausalLM,
    prompt: &[u32],
    cfg: &GenerationConfig,
) -> Result<Vec<i64>> {
    let mut out = generate_batch(model, &[prompt], &[cfg.max_new_tokens], cfg)?;
    Ok(out.pop().expect("one prompt, one answer"))
}

/// Generates for many prompts, `batch_size` at a time: prompts are sorted by
/// length so that a batch holds prompts of similar length (little padding),
/// and `done(i, tokens)` is called for prompt `i` of the given order as soon
/// as it and all prompts before it are finished.
pub fn generate_in_batches(
    model: &LlamaForCausalLM,
    prompts: &[Vec<u32>],
    limits: &[usize],
    cfg: &GenerationConfig,
    batch_size: usize,
    mut done: impl FnMut(usize, Vec<i64>) -> Result<()>,
) -> Result<()> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut ready: Vec<Option<Vec<i64>>> = vec![None; prompts.len()];
    let mut next = 0;
    for chunk in order.chunks(batch_size) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let lim: Vec<usize> = chunk.iter().map(|&i| limits[i]).collect();
        let outs = generate_batch(model, &batch, &lim, cfg)?;
        for (&i, out) in chunk.iter().zip(outs) {
            ready[i] = Some(out);
        }
        while next < prompts.len() {
            let Some(out) = ready[next].take() else { break };
            done(next, out)?;
            next += 1;
        }
    }
    Ok(())
}

/// One row of a batched generation.
struct Row {
    /// Prompt and generated ids (for the repetition penalty).
    seen: Vec<i64>,
    out: Vec<i64>,
    limit: usize,
    rng: SplitMix64,
}

/// Generates continuations of several prompts at once and returns the new
/// token ids of each, in order. Prompts of different lengths are padded on
/// the left (as transformers' batched `generate` does), with positions
/// counted from each row's first real token and the padding masked; each row
/// stops at its own EOS or after `limits[i]` tokens and leaves the batch.
/// Every row samples from its own generator seeded with `cfg.seed`, so a row
/// gets what it would get alone.
pub fn generate_batch(
    model: &LlamaForCausalLM,
    prompts: &[&[u32]],
    limits: &[usize],
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<i64>>> {
    cfg.validate()?;
    assert_eq!(prompts.len(), limits.len(), "one limit per prompt");
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("the prompt is empty after tokenization; give at least one token");
    }
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let padded = prompts.iter().any(|p| p.len() != width);
    let mut rows: Vec<Row> = prompts
        .iter()
        .zip(limits)
        .map(|(p, &limit)| Row {
            seen: p.iter().map(|&t| t as i64).collect(),
            out: Vec::with_capacity(limit.min(cfg.max_new_tokens).min(4096)),
            limit: limit.min(cfg.max_new_tokens),
            // Sampling depends on --seed alone, not on libtorch's global generator.
            rng: SplitMix64::new(cfg.seed),
        })
        .collect();
    // Rows still generating, in the order of the batch the cache holds.
    let mut active: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].limit > 0).collect();
    if active.len() < rows.len() {
        return generate_rows(model, &mut rows, active, cfg);
    }
    let seqs: Vec<&[i64]> = rows.iter().map(|r| r.seen.as_slice()).collect();
    let (mut input, mut attention) = left_padded(&seqs, width, device);
    // transformers' positions for left padding: the count of real tokens before.
    let mut positions = (attention.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    for step in 0.. {
        if model.rope_restarts_cache(cache.len(), input.size()[1]) {
            // LongRoPE switches to its long frequencies here: as transformers'
            // Phi-3, drop the cache and run every row's whole sequence again.
            let total = attention.size()[1] as usize;
            let seqs: Vec<&[i64]> = active.iter().map(|&r| rows[r].seen.as_slice()).collect();
            input = left_padded(&seqs, total, device).0;
            positions = (attention.cumsum(1, Kind::Int64) - 1).clamp_min(0);
            cache = KvCache::new(model.config.num_hidden_layers);
        }
        let input_desc = DecoderInput {
            input_ids: &input,
            position_ids: padded.then_some(&positions),
            layout: if padded {
                AttentionLayout::Padded {
                    attention_mask: &attention,
                }
            } else {
                AttentionLayout::Causal
            },
        };
        let hidden = model.forward_hidden(&input_desc, Some(&mut cache), &mut NoHooks);
        let logits = model.logits(&hidden.select(1, -1)).to_kind(Kind::Float);
        // Broken weights or settings give NaN logits, whose argmax is token 0
        // forever: an empty answer that looks like success.
        if bool::try_from(logits.isnan().any())? {
            bail!(
                "the model's output became NaN at new token {}; check the weights, the adapter and config.json (rms_norm_eps, rope settings)",
                step + 1
            );
        }
        let next = choose_batch(&logits, &mut rows, &active, cfg)?;
        let mut keep = Vec::with_capacity(active.len());
        for (k, (&r, &t)) in active.iter().zip(&next).enumerate() {
            let row = &mut rows[r];
            row.out.push(t);
            row.seen.push(t);
            if !cfg.eos_token_ids.contains(&t) && row.out.len() < row.limit {
                keep.push(k as i64);
            }
        }
        if keep.is_empty() {
            break;
        }
        let mut next_ids: Vec<i64> = next.clone();
        if keep.len() < active.len() {
            // Finished rows leave the batch and the cache.
            let keep_t = Tensor::from_slice(&keep).to_device(device);
            cache.select_rows(&keep_t);
            attention = attention.index_select(0, &keep_t);
            positions = positions.index_select(0, &keep_t);
            active = keep.iter().map(|&k| active[k as usize]).collect();
            next_ids = keep.iter().map(|&k| next[k as usize]).collect();
        }
        let n = active.len() as i64;
        input = Tensor::from_slice(&next_ids).view([n, 1]).to_device(device);
        attention = Tensor::cat(&[&attention, &attention.ones_like().narrow(1, 0, 1)], 1);
        positions = positions.narrow(1, positions.size()[1] - 1, 1) + 1;
    }
    Ok(rows.into_iter().map(|r| r.out).collect())
}

/// Some rows have a limit of 0: they get nothing, the others are generated.
fn generate_rows(
    model: &LlamaForCausalLM,
    rows: &mut [Row],
    active: Vec<usize>,
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<i64>>> {
    let prompts: Vec<Vec<u32>> = active
        .iter()
        .map(|&r| rows[r].seen.iter().map(|&t| t as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let limits: Vec<usize> = active.iter().map(|&r| rows[r].limit).collect();
    let mut outs = if refs.is_empty() {
        vec![]
    } else {
        generate_batch(model, &refs, &limits, cfg)?
    };
    let mut result = vec![Vec::new(); rows.len()];
    for (&r, out) in active.iter().zip(outs.drain(..)) {
        result[r] = out;
    }
    Ok(result)
}

/// `seqs` left-padded to `width` (with each row's first token, which the
/// mask hides) as `[rows, width]` ids, and their attention mask.
fn left_padded(seqs: &[&[i64]], width: usize, device: tch::Device) -> (Tensor, Tensor) {
    let mut ids = Vec::with_capacity(seqs.len() * width);
    let mut mask = Vec::with_capacity(seqs.len() * width);
    for seq in seqs {
        let pad = width - seq.len();
        ids.extend(std::iter::repeat_n(seq[0], pad).chain(seq.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, seq.len())));
    }
    let shape = [seqs.len() as i64, width as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask).view(shape).to_device(device),
    )
}

/// The next token of each active row from its `[rows, vocab]` logits: one
/// argmax over the batch when decoding greedily without penalty, else row by
/// row on the device (one scalar read per row).
fn choose_batch(
    logits: &Tensor,
    rows: &mut [Row],
    active: &[usize],
    cfg: &GenerationConfig,
) -> Result<Vec<i64>> {
    if cfg.temperature == 0.0 && cfg.repetition_penalty == 1.0 {
        return Ok(Vec::<i64>::try_from(
            logits.argmax(-1, false).to_device(tch::Device::Cpu),
        )?);
    }
    active
        .iter()
        .enumerate()
        .map(|(k, &r)| {
            let row = &mut rows[r];
            choose(logits.get(k as i64), &row.seen, cfg, &mut row.rng)
        })
        .collect()
}

fn choose(
    mut logits: Tensor,
    seen: &[i64],
    cfg: &GenerationConfig,
    rng: &mut SplitMix64,
) -> Result<i64> {
    if cfg.repetition_penalty != 1.0 {
        let idx = Tensor::from_slice(seen).to_device(logits.device());
        let picked = logits.index_select(0, &idx);
        let p = cfg.repetition_penalty;
        let penalised = (&picked * p).where_self(&picked.lt(0.0), &(&picked / p));
        logits = logits.index_put(&[Some(idx)], &penalised, false);
    }
    if cfg.temperature == 0.0 {
        return Ok(logits.argmax(-1, false).int64_value(&[]));
    }
    let mut logits = logits / cfg.temperature;
    if cfg.top_k > 0 && (cfg.top_k as i64) < logits.size()[0] {
        let (top, _) = logits.topk(cfg.top_k as i64, -1, true, true);
        let kth = top.get(cfg.top_k as i64 - 1);
        logits = logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        let (sorted, order) = logits.sort(-1, true);
        let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        // Drop a token when the tokens before it already reach top_p; the most
        // likely token always stays.
        let before = &cumulative - sorted.softmax(-1, Kind::Float);
        let drop_sorted = before.ge(cfg.top_p);
        let drop = drop_sorted.scatter(0, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    sample_index(&logits.softmax(-1, Kind::Float), rng.next_f64())
}

/// Inverse-CDF sampling on the device: the first token whose cumulative
/// probability exceeds `u`, read back as one number instead of copying the
/// vocabulary's probabilities to the host. The cumulative sums run in f64,
/// in order, so on the CPU the choice is exactly that of a host loop.
/// Probabilities that are not finite (or all zero) are an error, never a
/// token picked from NaN.
pub fn sample_index(probs: &Tensor, u: f64) -> Result<i64> {
    let p = probs.to_kind(Kind::Double);
    let total = p.cumsum(0, Kind::Double).get(-1);
    let t = total.double_value(&[]);
    if !(t.is_finite() && t > 0.0) {
        bail!("the sampling probabilities are not finite (their sum is {t}); the logits overflowed or became NaN");
    }
    let cumulative = (&p / &total).cumsum(0, Kind::Double);
    let below = cumulative.le(u).sum(Kind::Int64).int64_value(&[]);
    if below < p.size()[0] {
        return Ok(below);
    }
    // Rounding left u at or above the last sum: the last possible token.
    Ok(p.gt(0.0).nonzero().reshape([-1]).int64_value(&[-1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host loop generation used before sampling moved to the device.
    fn sample_on_host(probs: &[f32], u: f64) -> usize {
        let mut acc = 0.0f64;
        let total: f64 = probs.iter().map(|&p| p as f64).sum();
        for (i, &p) in probs.iter().enumerate() {
            acc += p as f64 / total;
            if u < acc {
                return i;
            }
        }
        probs.iter().rposition(|&p| p > 0.0).unwrap_or(0)
    }

    #[test]
    fn device_sampling_picks_what_the_host_loop_picked() {
        let mut g = SplitMix64::new(11);
        for trial in 0..200 {
            let n = 1 + (g.next_u64() % 5000) as i64;
            let logits = peft_regularizers::rng::with_torch_seed(trial, || {
                Tensor::randn([n], (Kind::Float, tch::Device::Cpu)) * 4.0
            });
            // Some exact zeros, as top-k and top-p leave.
            let logits = logits.masked_fill(&logits.lt(-6.0), f64::NEG_INFINITY);
            let probs = logits.softmax(-1, Kind::Float);
            let host = Vec::<f32>::try_from(&probs).unwrap();
            for u in [
                0.0,
                1e-12,
                g.next_f64(),
                g.next_f64(),
                0.5,
                1.0 - 1e-16,
                0.999_999_999,
            ] {
                assert_eq!(
                    sample_index(&probs, u).unwrap(),
                    sample_on_host(&host, u) as i64,
                    "trial {trial}, u {u}"
                );
            }
        }
    }

    #[test]
    fn probabilities_that_are_not_finite_are_an_error() {
        let nan = Tensor::from_slice(&[f32::NAN, 0.5, 0.5]);
        let err = sample_index(&nan, 0.3).unwrap_err().to_string();
        assert!(err.contains("not finite"), "{err}");
        // What 1e-40 as a temperature does to ordinary logits.
        let logits = Tensor::from_slice(&[2.0f32, 1.0, -3.0]) / 1e-40;
        assert!(sample_index(&logits.softmax(-1, Kind::Float), 0.3).is_err());
        let cfg = |t| GenerationConfig {
            temperature: t,
            ..Default::default()
        };
        let err = cfg(1e-40).validate().unwrap_err().to_string();
        assert!(err.contains("--temperature 0"), "{err}");
        cfg(0.0).validate().unwrap();
        cfg(MIN_TEMPERATURE).validate().unwrap();
    }

    #[test]
    fn answers_are_capped_to_the_models_positions() {
        let prompts = vec![vec![1u32; 10], vec![1u32; 500], vec![1u32; 3]];
        let mut limits = vec![100_000, 100_000, 5];
        let capped = fit_positions(&prompts, &mut limits, Some(512)).unwrap();
        assert_eq!((limits.as_slice(), capped), (&[502, 12, 5][..], 2));
        let mut limits = vec![7, 7, 7];
        assert_eq!(fit_positions(&prompts, &mut limits, None).unwrap(), 0);
        assert_eq!(limits, [7, 7, 7]);
        let err = fit_positions(&prompts, &mut [1, 1, 1], Some(400)).unwrap_err();
        assert!(err.to_string().contains("500 tokens"), "{err}");
    }
}
