//! Data loading: format detection, loss masks, truncation, error messages,
//! padding and batch order, with the default model's tokenizer.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use peft_rs::data::{
    batch_order, collate, load_dataset, split_holdout, DataFormat, DataOptions, Dataset, Example,
    IGNORE,
};
use peft_rs::tokenizer::Tokenizer;

const IM_END: &str = "<|im_end|>";
const SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

fn tok() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = peft_rs::device::default_model_dir();
        Tokenizer::from_model_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e:#} (run ./scripts/setup.sh first)", dir.display()))
    })
}

fn eos() -> i64 {
    let id = tok().eos_token_id().expect("SmolLM2 has an eos_token") as i64;
    assert_eq!(id, 2, "SmolLM2-135M-Instruct's <|im_end|> is id 2");
    id
}

fn opts(format: Option<DataFormat>, max_seq_len: usize, train_on_prompt: bool) -> DataOptions {
    DataOptions {
        format,
        max_seq_len,
        train_on_prompt,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `text` written as `name` in a new temporary folder, returned with it.
fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), name, text);
    (tmp, p)
}

fn load(path: &Path, o: &DataOptions) -> Dataset {
    load_dataset(path, tok(), eos(), o).unwrap_or_else(|e| panic!("{e:#}"))
}

fn load_err(path: &Path, o: &DataOptions) -> String {
    match load_dataset(path, tok(), eos(), o) {
        Ok(ds) => panic!(
            "{}: expected an error, got {} examples",
            path.display(),
            ds.examples.len()
        ),
        Err(e) => {
            // The location must survive plain `{}` too, and fit on one line.
            let plain = e.to_string();
            let full = format!("{e:#}");
            assert!(!full.contains('\n'), "error spans lines: {full}");
            assert!(
                plain.contains(&path.display().to_string()),
                "`{{}}` loses the file: {plain}"
            );
            full
        }
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

fn decode(ids: impl IntoIterator<Item = i64>) -> String {
    let ids: Vec<u32> = ids.into_iter().map(|t| t as u32).collect();
    tok().decode(&ids, false).unwrap()
}

/// The maximal runs of labelled positions, decoded.
fn labelled_runs(ex: &Example) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = Vec::new();
    for &l in &ex.labels {
        if l == IGNORE {
            if !cur.is_empty() {
                runs.push(decode(std::mem::take(&mut cur)));
            }
        } else {
            cur.push(l);
        }
    }
    if !cur.is_empty() {
        runs.push(decode(cur));
    }
    runs
}

fn masked_text(ex: &Example) -> String {
    decode(
        ex.input_ids
            .iter()
            .zip(&ex.labels)
            .filter(|(_, &l)| l == IGNORE)
            .map(|(&t, _)| t),
    )
}

/// Labels are either IGNORE or the input id at that position.
fn assert_labels_are_inputs(ex: &Example) {
    assert_eq!(ex.input_ids.len(), ex.labels.len());
    for (i, (&t, &l)) in ex.input_ids.iter().zip(&ex.labels).enumerate() {
        assert!(l == IGNORE || l == t, "label {l} at {i} is not token {t}");
    }
}

#[test]
fn format_names_round_trip() {
    for f in [
        DataFormat::Alpaca,
        DataFormat::Messages,
        DataFormat::PromptCompletion,
        DataFormat::Text,
    ] {
        assert_eq!(f.name().parse::<DataFormat>().unwrap(), f);
        assert_eq!(f.to_string(), f.name());
    }
    assert_eq!(
        "prompt-completion".parse::<DataFormat>().unwrap(),
        DataFormat::PromptCompletion
    );
    let e = "sharegpt".parse::<DataFormat>().unwrap_err().to_string();
    assert_has(
        &e,
        &[
            "sharegpt",
            "alpaca",
            "messages",
            "prompt-completion",
            "text",
        ],
    );
}

#[test]
fn detects_all_four_formats_in_arrays_and_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let records = [
        (
            DataFormat::Alpaca,
            r#"{"instruction": "Say hi.", "input": "", "output": "Hi."}"#,
            r#"{"instruction": "Add.", "input": "1 + 2", "output": "3"}"#,
        ),
        (
            DataFormat::Messages,
            r#"{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]}"#,
            r#"{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}"#,
        ),
        (
            DataFormat::PromptCompletion,
            r#"{"prompt": "The sky is", "completion": " blue."}"#,
            r#"{"prompt": "Grass is", "completion": " green."}"#,
        ),
        (
            DataFormat::Text,
            r#"{"text": "Once upon a time."}"#,
            r#"{"text": "The end."}"#,
        ),
    ];
    for (format, a, b) in records {
        let jsonl = write(
            tmp.path(),
            &format!("{}.jsonl", format.name()),
            &format!("{a}\n\n{b}\n"),
        );
        let array = write(
            tmp.path(),
            &format!("{}.json", format.name()),
            &format!("  [\n{a},\n{b}\n]\n"),
        );
        let from_jsonl = load(&jsonl, &opts(None, 512, false));
        let from_array = load(&array, &opts(None, 512, false));
        for ds in [&from_jsonl, &from_array] {
            assert_eq!(ds.format, format, "{}", ds.path.display());
            assert_eq!(ds.examples.len(), 2);
            assert_eq!((ds.truncated, ds.dropped), (0, 0));
        }
        assert_eq!(from_jsonl.examples, from_array.examples);
        // The same file read with its format given explicitly.
        assert_eq!(
            load(&jsonl, &opts(Some(format), 512, false)).examples,
            from_jsonl.examples
        );
    }
}

#[test]
fn alpaca_loss_is_on_the_output_and_eos_only() {
    let (_tmp, p) = temp_file(
        "a.jsonl",
        concat!(
            r#"{"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."}"#,
            "\n",
            r#"{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}"#,
            "\n",
            r#"{"instruction": "Give a number.", "output": "Seven"}"#,
            "\n",
        ),
    );
    let ds = load(&p, &opts(None, 512, false));
    assert_eq!(ds.format, DataFormat::Alpaca);
    let no_input = |instruction: &str| {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    };
    let expected = [
        (
            no_input("Name a primary colour."),
            "Red is a primary colour.",
        ),
        (
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n"
                .to_owned(),
            "Bonjour",
        ),
        (no_input("Give a number."), "Seven"),
    ];
    for (ex, (prompt, output)) in ds.examples.iter().zip(&expected) {
        assert_labels_are_inputs(ex);
        assert_eq!(labelled_runs(ex), vec![format!("{output}{IM_END}")]);
        assert_eq!(&masked_text(ex), prompt);
        // The masked part is the prefix; EOS ends the example.
        let first_label = ex.labels.iter().position(|&l| l != IGNORE).unwrap();
        assert!(ex.labels[..first_label].iter().all(|&l| l == IGNORE));
        assert_eq!(*ex.input_ids.last().unwrap(), eos());
        assert_eq!(
            decode(ex.input_ids.iter().copied()),
            format!("{prompt}{output}{IM_END}")
        );
    }

    let all = load(&p, &opts(None, 512, true));
    for (ex, masked) in all.examples.iter().zip(&ds.examples) {
        assert_eq!(ex.input_ids, masked.input_ids);
        assert_eq!(
            ex.labels, ex.input_ids,
            "train_on_prompt labels every token"
        );
    }
}

#[test]
fn prompt_completion_and_text() {
    let (tmp, p) = temp_file(
        "pc.jsonl",
        "{\"prompt\": \"Q: What is the capital of Italy?\\nA:\", \"completion\": \" Rome\"}\n",
    );
    let ex = &load(&p, &opts(None, 512, false)).examples[0];
    assert_labels_are_inputs(ex);
    assert_eq!(labelled_runs(ex), vec![format!(" Rome{IM_END}")]);
    assert_eq!(masked_text(ex), "Q: What is the capital of Italy?\nA:");

    let t = write(
        tmp.path(),
        "t.jsonl",
        "{\"text\": \"Plain text is trained on everywhere.\"}\n",
    );
    let ds = load(&t, &opts(None, 512, false));
    assert_eq!(ds.format, DataFormat::Text);
    let ex = &ds.examples[0];
    assert_eq!(ex.labels, ex.input_ids);
    assert_eq!(
        decode(ex.input_ids.iter().copied()),
        format!("Plain text is trained on everywhere.{IM_END}")
    );
}

#[test]
fn messages_loss_is_on_assistant_turns_only() {
    let (_tmp, p) = temp_file(
        "chat.jsonl",
        concat!(
            r#"{"messages": [{"role": "user", "content": "What is 2+2?"}, "#,
            r#"{"role": "assistant", "content": "2+2 is 4."}, "#,
            r#"{"role": "user", "content": "And 3+3?"}, "#,
            r#"{"role": "assistant", "content": "3+3 is 6."}]}"#,
            "\n",
            r#"{"messages": [{"role": "system", "content": "Answer briefly."}, "#,
            r#"{"role": "user", "content": "Capital of Spain?"}, "#,
            r#"{"role": "assistant", "content": "Madrid"}]}"#,
            "\n"
        ),
    );
    let ds = load(&p, &opts(None, 512, false));
    assert_eq!(ds.format, DataFormat::Messages);

    let first = &ds.examples[0];
    assert_labels_are_inputs(first);
    assert_eq!(
        labelled_runs(first),
        vec![format!("2+2 is 4.{IM_END}"), format!("3+3 is 6.{IM_END}")]
    );
    // The input is the template's rendering, with no second EOS after the
    // final "<|im_end|>\n".
    assert_eq!(
        decode(first.input_ids.iter().copied()),
        format!(
            "{SYSTEM}<|im_start|>user\nWhat is 2+2?{IM_END}\n<|im_start|>assistant\n2+2 is 4.{IM_END}\n\
             <|im_start|>user\nAnd 3+3?{IM_END}\n<|im_start|>assistant\n3+3 is 6.{IM_END}\n"
        )
    );
    assert_eq!(
        first.input_ids,
        tok()
            .encode(&decode(first.input_ids.iter().copied()), false)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect::<Vec<_>>()
    );

    let second = &ds.examples[1];
    assert_eq!(labelled_runs(second), vec![format!("Madrid{IM_END}")]);
    assert_eq!(
        masked_text(second),
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nCapital of Spain?<|im_end|>\n\
         <|im_start|>assistant\n\n"
    );

    let all = load(&p, &opts(None, 512, true));
    for ex in &all.examples {
        assert_eq!(ex.labels, ex.input_ids);
    }
}

/// The default tokenizer with another chat template.
fn tokenizer_with_template(dir: &Path, template: &str) -> Tokenizer {
    let model = peft_rs::device::default_model_dir();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
    Tokenizer::from_model_dir(dir).unwrap()
}

#[test]
fn messages_with_other_templates() {
    let (tmp, p) = temp_file(
        "chat.jsonl",
        &format!(
            "{}
{}
",
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#.replace(
                r#"}]}"#,
                r#"}, {"role": "assistant", "content": "hello there"}]}"#
            ),
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}"#
        ),
    );
    let o = opts(None, 512, false);

    // A template that writes no end-of-turn token: EOS is appended and
    // learned, after the turn's own text.
    let plain_dir = tmp.path().join("plain");
    std::fs::create_dir(&plain_dir).unwrap();
    let plain = tokenizer_with_template(
        &plain_dir,
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}assistant: {% endif %}",
    );
    let ds = load_dataset(&p, &plain, eos(), &o).unwrap();
    let ex = &ds.examples[0];
    let runs = |ex: &Example| {
        let mut out = Vec::new();
        let mut cur = Vec::new();
        for &l in ex.labels.iter().chain([IGNORE].iter()) {
            if l == IGNORE {
                if !cur.is_empty() {
                    let ids: Vec<u32> = std::mem::take(&mut cur);
                    out.push(plain.decode(&ids, false).unwrap());
                }
            } else {
                cur.push(l as u32);
            }
        }
        out
    };
    // "assistant: " ends in a space that the tokenizer merges into the
    // answer's first token; that token must still be learned.
    let trimmed = |ex: &Example| -> Vec<String> {
        runs(ex).iter().map(|r| r.trim_start().to_owned()).collect()
    };
    assert_eq!(trimmed(ex), vec![format!("hello there\n{IM_END}")]);
    assert_eq!(
        trimmed(&ds.examples[1]),
        vec!["b\n".to_owned(), format!("d\n{IM_END}")]
    );

    // A template whose header depends on the number of turns renders no
    // prefixes: masking is impossible and says so, at the record's line.
    let counted_dir = tmp.path().join("counted");
    std::fs::create_dir(&counted_dir).unwrap();
    let counted = tokenizer_with_template(
        &counted_dir,
        "{{ messages|length }} turns\n{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
    );
    let e = format!("{:#}", load_dataset(&p, &counted, eos(), &o).unwrap_err());
    assert_has(
        &e,
        &["chat.jsonl:1", "messages[1]", "prefix", "--train-on-prompt"],
    );
    // Training on everything needs no masking.
    let all = load_dataset(&p, &counted, eos(), &opts(None, 512, true)).unwrap();
    assert_eq!(all.examples.len(), 2);
    for ex in &all.examples {
        assert_eq!(ex.labels, ex.input_ids);
    }
}

#[test]
fn truncation_is_counted_and_examples_without_labels_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let long_output = "word ".repeat(200);
    let long_instruction = "Please read this carefully. ".repeat(40);
    let p = write(
        tmp.path(),
        "t.jsonl",
        &[
            serde_json::json!({"instruction": "Short.", "output": "Fine."}),
            serde_json::json!({"instruction": "Repeat.", "output": long_output}),
            serde_json::json!({"instruction": long_instruction, "output": "Lost."}),
        ]
        .iter()
        .map(|v| v.to_string() + "\n")
        .collect::<String>(),
    );
    let full = load(&p, &opts(None, 4096, false));
    assert_eq!((full.truncated, full.dropped), (0, 0));
    let short_len = full.examples[0].input_ids.len();
    let max = 64;
    assert!(short_len < max, "the short example ({short_len}) must fit");
    assert!(full.examples[2]
        .labels
        .iter()
        .take(max)
        .all(|&l| l == IGNORE));

    let ds = load(&p, &opts(None, max, false));
    assert_eq!(ds.truncated, 2, "the long output and the long prompt");
    assert_eq!(ds.dropped, 1, "the long prompt leaves no label");
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.examples[0], full.examples[0]);
    let cut = &ds.examples[1];
    assert_eq!(cut.input_ids.len(), max);
    assert_eq!(cut.input_ids[..], full.examples[1].input_ids[..max]);
    assert_eq!(cut.labels[..], full.examples[1].labels[..max]);

    // With the prompt trained on too, nothing is dropped.
    let all = load(&p, &opts(None, max, true));
    assert_eq!((all.truncated, all.dropped, all.examples.len()), (2, 0, 3));

    // When every example is dropped the error says why.
    let only_long = write(
        tmp.path(),
        "long.jsonl",
        &(serde_json::json!({"instruction": long_instruction, "output": "x"}).to_string() + "\n"),
    );
    let e = load_err(&only_long, &opts(None, max, false));
    assert_has(&e, &["long.jsonl", "max-seq-len", "64", "prompt"]);
}

#[test]
fn malformed_records_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(None, 512, false);
    let good = r#"{"instruction": "a", "output": "b"}"#;
    // The error of loading `text`, written as `name`.
    let err = |name: &str, text: &str| load_err(&write(tmp.path(), name, text), &o);

    assert_has(
        &err(
            "missing.jsonl",
            &format!("{good}\n{good}\n{{\"instruction\": \"c\", \"outptu\": \"d\"}}\n"),
        ),
        &["missing.jsonl:3", "`output`", "missing", "instruction"],
    );

    assert_has(
        &err(
            "type.jsonl",
            &format!("{good}\n{{\"instruction\": \"c\", \"output\": 42}}\n"),
        ),
        &["type.jsonl:2", "`output`", "string", "number"],
    );

    assert_has(
        &err(
            "input.jsonl",
            "{\"instruction\": \"c\", \"input\": [1], \"output\": \"d\"}\n",
        ),
        &["input.jsonl:1", "`input`", "string"],
    );

    // Blank lines still count in line numbers.
    assert_has(
        &err(
            "invalid.jsonl",
            &format!("{good}\n\n{{\"instruction\": \"c\", \"output\": \"d\"\n{good}\n"),
        ),
        &["invalid.jsonl:3", "JSON"],
    );

    assert_has(
        &err("shape.jsonl", "{\"question\": \"q\", \"answer\": \"a\"}\n"),
        &[
            "shape.jsonl:1",
            "format",
            "question",
            "instruction",
            "messages",
            "prompt",
            "text",
        ],
    );

    assert_has(
        &err("scalar.jsonl", "\"just a string\"\n"),
        &["scalar.jsonl:1", "object"],
    );

    // In a JSON array, the line where the bad record starts.
    assert_has(
        &err(
            "array.json",
            &format!("[\n  {good},\n  {good},\n\n  {{\"instruction\": \"x\"}}\n]\n"),
        ),
        &["array.json:5", "`output`", "missing"],
    );
    assert_has(
        &err(
            "broken.json",
            &format!("[\n  {good},\n  {good}\n  {good}\n]\n"),
        ),
        &["broken.json:4", "JSON"],
    );

    // The format is decided by the first record; a later record of another
    // shape is an error, not a silent skip.
    assert_has(
        &err("mixed.jsonl", &format!("{good}\n{{\"text\": \"t\"}}\n")),
        &["mixed.jsonl:2", "`instruction`", "missing"],
    );

    let p = write(tmp.path(), "forced.jsonl", &format!("{good}\n"));
    assert_has(
        &load_err(&p, &opts(Some(DataFormat::Text), 512, false)),
        &["forced.jsonl:1", "`text`", "missing"],
    );

    let chat = |messages: &str| format!("{{\"messages\": {messages}}}\n");
    assert_has(
        &err(
            "chat_type.jsonl",
            &chat(r#"[{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]"#),
        ),
        &[
            "chat_type.jsonl:1",
            "messages[1].content",
            "string",
            "number",
        ],
    );
    assert_has(
        &err("chat_role.jsonl", &chat(r#"[{"content": "hi"}]"#)),
        &["chat_role.jsonl:1", "messages[0].role", "missing"],
    );
    assert_has(
        &err("chat_list.jsonl", &chat(r#""hello""#)),
        &["chat_list.jsonl:1", "`messages`", "list"],
    );
    assert_has(
        &err(
            "no_assistant.jsonl",
            &format!(
                "{}{}",
                chat(
                    r#"[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]"#
                ),
                chat(r#"[{"role": "user", "content": "only a question"}]"#)
            ),
        ),
        &["no_assistant.jsonl:2", "assistant"],
    );
}

#[test]
fn empty_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(None, 512, false);
    for (name, text) in [
        ("e.jsonl", ""),
        ("blank.jsonl", "\n  \n\n"),
        ("e.json", " [ ]\n"),
    ] {
        let p = write(tmp.path(), name, text);
        assert_has(&load_err(&p, &o), &[name, "empty"]);
    }
    let missing = tmp.path().join("nope.jsonl");
    assert_has(&load_err(&missing, &o), &["nope.jsonl", "cannot read"]);
}

#[test]
fn collate_pads_right_and_counts() {
    let a = Example {
        input_ids: vec![10, 11, 12, 13],
        labels: vec![IGNORE, IGNORE, 12, 13],
        segments: vec![],
    };
    let b = Example {
        input_ids: vec![20, 21],
        labels: vec![20, 21],
        segments: vec![],
    };
    let pad = 7;
    let batch = collate(&[&a, &b], pad);
    let rows = |t: &tch::Tensor| -> Vec<Vec<i64>> {
        assert_eq!(t.size(), [2, 4]);
        assert_eq!(t.kind(), tch::Kind::Int64);
        (0..2)
            .map(|i| Vec::<i64>::try_from(t.get(i)).unwrap())
            .collect()
    };
    assert_eq!(
        rows(&batch.input_ids),
        vec![vec![10, 11, 12, 13], vec![20, 21, pad, pad]]
    );
    assert_eq!(
        rows(&batch.labels),
        vec![vec![IGNORE, IGNORE, 12, 13], vec![20, 21, IGNORE, IGNORE]]
    );
    assert_eq!(
        rows(&batch.attention_mask),
        vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]
    );
    assert_eq!(batch.num_tokens, 6);
    // Position 0 is never a target: a has 2 (12, 13), b has 1 (21).
    assert_eq!(batch.num_label_tokens, 3);

    let single = collate(&[&b], pad);
    assert_eq!(single.input_ids.size(), [1, 2]);
    assert_eq!(
        single.attention_mask.sum(tch::Kind::Int64).int64_value(&[]),
        2
    );
}

fn check_partition(batches: &[Vec<usize>], n: usize, batch_size: usize) {
    let mut seen = vec![0usize; n];
    for b in batches {
        for &i in b {
            seen[i] += 1;
        }
    }
    assert!(seen.iter().all(|&c| c == 1), "every index exactly once");
    assert_eq!(batches.len(), n.div_ceil(batch_size));
    let short: Vec<usize> = batches
        .iter()
        .map(Vec::len)
        .filter(|&l| l != batch_size)
        .collect();
    assert!(short.len() <= 1, "at most one partial batch, got {short:?}");
    assert_eq!(short.first().copied().unwrap_or(0), n % batch_size);
}

#[test]
fn batch_order_is_a_seeded_partition() {
    let n = 1003;
    let lengths: Vec<usize> = (0..n).map(|i| (i * 7919) % 500 + 5).collect();
    for group in [false, true] {
        for bs in [1, 4, 8, 50] {
            let a = batch_order(&lengths, bs, group, 42, 0);
            check_partition(&a, n, bs);
            assert_eq!(a, batch_order(&lengths, bs, group, 42, 0), "deterministic");
            assert_ne!(a, batch_order(&lengths, bs, group, 42, 1), "epochs differ");
            assert_ne!(a, batch_order(&lengths, bs, group, 43, 0), "seeds differ");
        }
        // Shuffled, not the identity order.
        let flat: Vec<usize> = batch_order(&lengths, 8, group, 1, 0).concat();
        assert_ne!(flat, (0..n).collect::<Vec<_>>());
    }
    assert!(batch_order(&[], 4, true, 0, 0).is_empty());
    check_partition(&batch_order(&[3, 1, 2], 8, true, 0, 0), 3, 8);
}

#[test]
fn grouped_batches_start_with_the_longest_example() {
    let n = 1003;
    let lengths: Vec<usize> = (0..n).map(|i| (i * 7919) % 500 + 5).collect();
    let longest = *lengths.iter().max().unwrap();
    for seed in 0..20 {
        let grouped = batch_order(&lengths, 4, true, seed, 0);
        assert_eq!(lengths[grouped[0][0]], longest, "seed {seed}");
        // Still shuffled: the other batches do not follow their lengths.
        let firsts: Vec<usize> = grouped[1..].iter().map(|b| lengths[b[0]]).collect();
        assert!(firsts.windows(2).any(|w| w[0] < w[1]), "seed {seed}");
    }
    // Without grouping the order is the shuffle's alone.
    let plain: Vec<bool> = (0..20)
        .map(|seed| lengths[batch_order(&lengths, 4, false, seed, 0)[0][0]] == longest)
        .collect();
    assert!(plain.iter().any(|&first| !first));
}

fn padding(lengths: &[usize], batches: &[Vec<usize>]) -> usize {
    batches
        .iter()
        .map(|b| {
            let max = b.iter().map(|&i| lengths[i]).max().unwrap();
            b.iter().map(|&i| max - lengths[i]).sum::<usize>()
        })
        .sum()
}

#[test]
fn alpaca_5000_loads_and_grouping_saves_padding() {
    let alpaca = common::shared("data/alpaca_5000.json");
    let path = alpaca.as_path();
    // Time the loading alone, not reading tokenizer.json.
    tok();
    let start = Instant::now();
    let ds = load(path, &opts(None, 512, false));
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{}: {} examples in {secs:.2} s ({} truncated, {} dropped)",
        path.display(),
        ds.examples.len(),
        ds.truncated,
        ds.dropped
    );
    assert_eq!(ds.format, DataFormat::Alpaca);
    assert_eq!(ds.examples.len() + ds.dropped, 5000);
    assert_eq!(ds.dropped, 0);
    assert!(
        ds.truncated < 50,
        "{} of 5000 over 512 tokens",
        ds.truncated
    );
    let lengths: Vec<usize> = ds.examples.iter().map(|e| e.input_ids.len()).collect();
    let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
    assert!((50.0..300.0).contains(&mean), "mean length {mean}");
    assert!(lengths.iter().all(|&l| l <= 512));
    let labelled: usize = ds.examples.iter().map(|e| e.num_label_tokens()).sum();
    let total: usize = lengths.iter().sum();
    assert!(
        labelled > 5000 && labelled < total / 2 + total / 4,
        "{labelled} of {total} tokens take a loss"
    );
    for ex in &ds.examples {
        assert_labels_are_inputs(ex);
        if ex.input_ids.len() < 512 {
            assert_eq!(ex.input_ids.last(), Some(&eos()));
            assert_eq!(ex.labels.last(), Some(&eos()));
        }
    }

    for bs in [4, 16] {
        let plain = padding(&lengths, &batch_order(&lengths, bs, false, 42, 0));
        let grouped = padding(&lengths, &batch_order(&lengths, bs, true, 42, 0));
        eprintln!("batch size {bs}: padding {plain} tokens shuffled, {grouped} grouped");
        assert!(
            grouped * 4 < plain,
            "grouping by length should cut padding several-fold: {grouped} vs {plain}"
        );
    }
}

#[test]
fn holdout_split_is_deterministic_and_disjoint() {
    let tmp = tempfile::tempdir().unwrap();
    let text: String = (0..40)
        .map(|i| serde_json::json!({"text": format!("record number {i}")}).to_string() + "\n")
        .collect();
    let p = write(tmp.path(), "t.jsonl", &text);
    let ds = load(&p, &opts(None, 512, false));
    let original = ds.examples.clone();
    let (train, eval) = split_holdout(ds.clone(), 7, 3);
    assert_eq!((train.examples.len(), eval.examples.len()), (33, 7));
    assert_eq!(eval.format, DataFormat::Text);
    assert_eq!(eval.path, p);
    let (train2, eval2) = split_holdout(ds.clone(), 7, 3);
    assert_eq!(
        (train.examples.clone(), eval.examples.clone()),
        (train2.examples, eval2.examples)
    );
    let (_, other) = split_holdout(ds, 7, 4);
    assert_ne!(other.examples, eval.examples, "the seed picks the slice");
    // Disjoint, complete, and each part in file order.
    let pos = |e: &Example| original.iter().position(|o| o == e).unwrap();
    let t: Vec<usize> = train.examples.iter().map(pos).collect();
    let e: Vec<usize> = eval.examples.iter().map(pos).collect();
    assert!(t.windows(2).all(|w| w[0] < w[1]) && e.windows(2).all(|w| w[0] < w[1]));
    let all: HashSet<usize> = t.iter().chain(&e).copied().collect();
    assert_eq!(all.len(), 40);
}

#[test]
fn the_demo_dates_chats_learn_exactly_the_answers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dates/train.jsonl");
    let ds = load(&path, &opts(None, 512, false));
    assert_eq!(ds.format, DataFormat::Messages);
    let text = std::fs::read_to_string(&path).unwrap();
    let answers: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let msgs = v["messages"].as_array().unwrap();
            msgs.last().unwrap()["content"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ds.examples.len(), answers.len());
    for (ex, answer) in ds.examples.iter().zip(&answers) {
        assert_eq!(labelled_runs(ex), vec![format!("{answer}{IM_END}")]);
    }
}

#[test]
fn generation_cases_hold_the_training_prompts() {
    let (tmp, p) = temp_file(
        "a.json",
        r#"[{"instruction": "Say yes.", "input": "", "output": "Yes"}]"#,
    );
    let cases = peft_rs::data::generation_cases(&p, tok(), None).unwrap();
    assert_eq!(cases.len(), 1);
    assert_eq!(cases[0].reference, "Yes");
    let train = &load(&p, &opts(None, 512, false)).examples[0];
    let prompt_len = train.labels.iter().position(|&l| l != IGNORE).unwrap();
    let train_prompt: Vec<u32> = train.input_ids[..prompt_len]
        .iter()
        .map(|&t| t as u32)
        .collect();
    assert_eq!(cases[0].prompt_ids, train_prompt);

    let c = write(
        tmp.path(),
        "c.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n",
    );
    let e = match peft_rs::data::generation_cases(&c, tok(), None) {
        Ok(_) => panic!("a chat without an answer cannot be scored"),
        Err(e) => format!("{e:#}"),
    };
    assert_has(&e, &["c.jsonl:2", "assistant"]);
    let one = write(
        tmp.path(),
        "one.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n",
    );
    let cases = peft_rs::data::generation_cases(&one, tok(), None).unwrap();
    assert_eq!(cases[0].reference, "Hello");
    assert_eq!(
        tok().decode(&cases[0].prompt_ids, false).unwrap(),
        format!("{SYSTEM}<|im_start|>user\nHi{IM_END}\n<|im_start|>assistant\n")
    );
}
