"""What the Python sides of the benchmarks share: the Alpaca records turned
into training examples as peft-rs builds them."""


def prompt(r):
    # The Stanford Alpaca prompt, as peft-rs writes it.
    if r.get("input"):
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{r['instruction']}\n\n### Response:\n"
    )


def alpaca_examples(tok, records, max_len):
    """TRL-style examples (prompt + completion + EOS tokenized together, the
    prompt's tokens masked, cut at max_len), without those left with no label;
    returns them and their number of real tokens."""

    def tokenize(r):
        p = prompt(r)
        ids = tok(p + r["output"] + tok.eos_token)["input_ids"][:max_len]
        n = len(tok(p)["input_ids"])
        labels = [-100] * min(n, len(ids)) + ids[n:]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    examples = [tokenize(r) for r in records]
    examples = [e for e in examples if any(x != -100 for x in e["labels"][1:])]
    return examples, sum(len(e["input_ids"]) for e in examples)
