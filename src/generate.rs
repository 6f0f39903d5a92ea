//! Text generation with a KV cache: greedy by default, or temperature and
//! nucleus (top-p) sampling from a seeded generator.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use crate::models::{KvCache, LlamaForCausalLM};
use peft_regularizers::rng::SplitMix64;

/// The most new tokens one prompt may ask for.
pub const MAX_NEW_TOKENS: usize = 1 << 20;

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

/// Generates a continuation of one prompt and returns the new token ids.
pub fn generate(
    model: &LlamaForCausalLM,
    prompt: &[u32],
    cfg: &GenerationConfig,
) -> Result<Vec<i64>> {
    cfg.validate()?;
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization; give at least one token");
    }
    let _guard = tch::no_grad_guard();
    let device = model.device();
    // Sampling depends on --seed alone, not on libtorch's global generator.
    let mut rng = SplitMix64::new(cfg.seed);
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut seen: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut input = Tensor::from_slice(&seen).unsqueeze(0).to_device(device);
    let mut out = Vec::with_capacity(cfg.max_new_tokens.min(4096));
    for i in 0..cfg.max_new_tokens {
        let hidden = model.forward_hidden(&input, Some(&mut cache), None);
        let last = hidden.select(1, -1);
        let logits = model.logits(&last).squeeze_dim(0).to_kind(Kind::Float);
        // Broken weights or settings give NaN logits, whose argmax is token 0
        // forever: an empty answer that looks like success.
        if bool::try_from(logits.isnan().any())? {
            bail!(
                "the model's output became NaN at new token {}; check the weights, the adapter and config.json (rms_norm_eps, rope settings)",
                i + 1
            );
        }
        let next = choose(logits, &seen, cfg, &mut rng);
        out.push(next);
        seen.push(next);
        if cfg.eos_token_ids.contains(&next) {
            break;
        }
        input = Tensor::from_slice(&[next]).unsqueeze(0).to_device(device);
    }
    Ok(out)
}

fn choose(mut logits: Tensor, seen: &[i64], cfg: &GenerationConfig, rng: &mut SplitMix64) -> i64 {
    if cfg.repetition_penalty != 1.0 {
        let idx = Tensor::from_slice(seen).to_device(logits.device());
        let picked = logits.index_select(0, &idx);
        let p = cfg.repetition_penalty;
        let penalised = (&picked * p).where_self(&picked.lt(0.0), &(&picked / p));
        logits = logits.index_put(&[Some(idx)], &penalised, false);
    }
    if cfg.temperature == 0.0 {
        return logits.argmax(-1, false).int64_value(&[]);
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
    let probs = Vec::<f32>::try_from(logits.softmax(-1, Kind::Float).to_device(tch::Device::Cpu))
        .unwrap_or_default();
    sample(&probs, rng.next_f64()) as i64
}

fn sample(probs: &[f32], u: f64) -> usize {
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
