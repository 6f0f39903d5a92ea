//! Tokenizing records as TRL does: prompt and completion together, the loss
//! from the first token that covers a byte of the completion, completions
//! ended with `tokenizer.eos_token`, chats rendered with their template and
//! learned on assistant turns; text beyond what `max_seq_len` can use is cut
//! before tokenizing.

use anyhow::{bail, Result};
use serde_json::Value;

use super::formats::{alpaca_parts, chat_messages, string_field, DataFormat};
use super::{DataOptions, Example, IGNORE};
use crate::tokenizer::{Message, Span, Tokenizer};

/// Bytes of text that surely hold more than `max_seq_len` tokens: no token
/// covers more than twice its vocabulary string's length, and a margin keeps
/// the tokens before the cut exactly as the whole text would give them.
/// Text past it is cut before tokenizing, so that one huge record costs
/// memory and time in proportion to what is kept, not to its size.
pub(crate) fn text_budget(tok: &Tokenizer, max_seq_len: usize) -> usize {
    max_seq_len
        .saturating_mul(2 * tok.max_token_bytes())
        .saturating_add(64 << 10)
}

/// `text` cut to at most `budget` bytes, at a character boundary.
pub(crate) fn cut(text: &str, budget: usize) -> &str {
    if text.len() <= budget {
        return text;
    }
    let mut end = budget;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

pub(crate) fn ids(v: Vec<u32>) -> Vec<i64> {
    v.into_iter().map(i64::from).collect()
}

/// Prompt and completion tokenized together, as the model sees them, with
/// the loss on every token that covers a byte of the completion, then the
/// EOS. Tokenizing the two apart would be wrong for SentencePiece tokenizers
/// (Llama-2, Mistral, Gemma): the completion alone starts a new "word" and
/// gets a `▁` that the joined text does not have. This is what TRL does
/// (tokenize prompt + completion, mask the prompt's share).
pub(crate) fn prompt_completion(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
    eos: i64,
    train_on_prompt: bool,
    budget: usize,
) -> Result<Example> {
    let joined = format!("{prompt}{completion}");
    let text = cut(&joined, budget);
    let (tokens, offsets) = tok.encode_with_offsets(text, true)?;
    let input_ids = ids(tokens);
    let boundary = prompt.len();
    let labels: Vec<i64> = input_ids
        .iter()
        .zip(&offsets)
        .map(|(&t, &(_, end))| {
            if train_on_prompt || end > boundary {
                t
            } else {
                IGNORE
            }
        })
        .collect();
    // TRL appends `tokenizer.eos_token` unless the completion already ends with it.
    let end = input_ids.last() != Some(&eos);
    Ok(Example::ended(input_ids, labels, end.then_some(eos)))
}

pub(crate) fn tokenize(
    rec: &Value,
    format: DataFormat,
    tok: &Tokenizer,
    eos: i64,
    opts: &DataOptions,
    budget: usize,
) -> Result<Example> {
    let train_on_prompt = opts.train_on_prompt;
    match format {
        DataFormat::Alpaca => {
            let (prompt, output) = alpaca_parts(rec)?;
            prompt_completion(tok, &prompt, output, eos, train_on_prompt, budget)
        }
        DataFormat::PromptCompletion => {
            let prompt = string_field(rec, "prompt", format)?;
            let completion = string_field(rec, "completion", format)?;
            prompt_completion(tok, prompt, completion, eos, train_on_prompt, budget)
        }
        DataFormat::Text => prompt_completion(
            tok,
            "",
            string_field(rec, "text", format)?,
            eos,
            true,
            budget,
        ),
        DataFormat::Messages => {
            let messages = chat_messages(rec)?;
            if !messages.iter().any(|m| m.role == "assistant") {
                bail!(
                    "field `messages` has no assistant turn to learn from (roles: {})",
                    messages
                        .iter()
                        .map(|m| m.role.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let messages = within_budget(messages, budget);
            if !messages.iter().any(|m| m.role == "assistant") {
                // Every answer lies past max_seq_len: dropped and counted.
                return Ok(Example::default());
            }
            chat_example(&messages, tok, eos, train_on_prompt, opts.max_seq_len)
        }
    }
}

/// The turns of a chat that can reach the model within `budget` bytes of
/// content: later turns would be truncated away, so they are not rendered
/// (rendering every prefix of a chat costs the square of its length).
pub(crate) fn within_budget(mut messages: Vec<Message>, budget: usize) -> Vec<Message> {
    let mut used = 0usize;
    for (i, m) in messages.iter_mut().enumerate() {
        if used + m.content.len() > budget {
            let keep = cut(&m.content, budget - used).len();
            m.content.truncate(keep);
            messages.truncate(i + 1);
            break;
        }
        used += m.content.len();
    }
    messages
}

/// A chat rendered with the model's template, the loss on the assistant
/// turns.
///
/// Where the template marks assistant text with `{% generation %}` blocks,
/// those blocks are the turns, exactly as transformers'
/// `return_assistant_tokens_mask` reads them. Otherwise assistant turn i is
/// the text between the rendering of the turns before it with the generation
/// prompt and the rendering up to it: what the model must write when it
/// generates that turn, whatever the template's markup. That text ends with
/// the template's end-of-turn token (`<|eot_id|>`, `<|im_end|>`,
/// `<end_of_turn>`, `</s>`) and possibly a separator after it; the turn is
/// learned through its last special token and not beyond, since generation
/// stops there.
pub(crate) fn chat_example(
    messages: &[Message],
    tok: &Tokenizer,
    eos: i64,
    train_on_prompt: bool,
    max_seq_len: usize,
) -> Result<Example> {
    let marked = tok.has_generation_blocks();
    let (full, marked_spans) = if marked {
        tok.apply_chat_template_with_generation_spans(messages)?
    } else {
        (tok.apply_chat_template(messages, false)?, vec![])
    };
    let (tokens, offsets) = tok.encode_with_offsets(&full, false)?;
    // Turns that start past the last token kept by truncation need not be
    // located (locating turn i renders the i turns before it).
    let kept_end = offsets
        .get(max_seq_len.min(offsets.len()).saturating_sub(1))
        .map_or(0, |o| o.1);
    let spans = if marked || train_on_prompt {
        // With the loss on every token there is nothing to locate, which also
        // lets templates that fail the prefix check below be used.
        marked_spans
    } else {
        assistant_spans(tok, messages, &full, kept_end)?
    };
    let input_ids = ids(tokens);
    let mut labels = vec![IGNORE; input_ids.len()];
    if train_on_prompt {
        labels.clone_from(&input_ids);
    }
    for &(a, b) in &spans {
        // A token takes a loss when it covers any byte of a turn, as
        // transformers' `return_assistant_tokens_mask` does: a generation
        // prompt ending in a space ("assistant: ") merges with the first word
        // of the answer into one token, which must not be lost.
        let first = offsets.partition_point(|o| o.1 <= a);
        let covering: Vec<usize> = (first..input_ids.len())
            .take_while(|&i| offsets[i].0 < b)
            .filter(|&i| offsets[i].1 > a)
            .collect();
        let last = match covering
            .iter()
            .rposition(|&i| tok.is_special(input_ids[i] as u32))
        {
            Some(k) if !marked => k,
            _ => covering.len().saturating_sub(1),
        };
        for &i in covering.iter().take(last + 1) {
            labels[i] = input_ids[i];
        }
    }
    // A template that writes no special token after the last turn gives the
    // model no way to stop: append the EOS, as for the other formats.
    let content_end = full.trim_end().len();
    let last_real = offsets.iter().rposition(|&(s, _)| s < content_end);
    let ends_special = last_real.is_some_and(|i| tok.is_special(input_ids[i] as u32));
    let end = !marked && !ends_special;
    Ok(Example::ended(input_ids, labels, end.then_some(eos)))
}

/// The byte spans of the assistant turns in `full` (the whole chat rendered)
/// that start before byte `until`, each from the end of the generation
/// prompt before it to the end of its rendering.
pub(crate) fn assistant_spans(
    tok: &Tokenizer,
    messages: &[Message],
    full: &str,
    until: usize,
) -> Result<Vec<Span>> {
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.apply_chat_template(&messages[..i], true)?;
        if before.len() >= until {
            break;
        }
        let upto = tok.apply_chat_template(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&upto) || before.len() > upto.len() {
            bail!(
                "the chat template does not render the turns before `messages[{i}]` as a prefix \
                 of the whole conversation, so the assistant turn cannot be located for masking; \
                 use --train-on-prompt, or the prompt-completion format with the prompt rendered beforehand"
            );
        }
        spans.push((before.len(), upto.len()));
    }
    Ok(spans)
}
