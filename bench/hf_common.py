"""What the Python sides of the training benchmarks share: the command line,
the Alpaca records turned into training examples as peft-rs builds them, the
LoRA training run as transformers' Trainer + PEFT make it, and the result file."""
import json
import time


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


def setup(argv):
    """The command line MODEL_DIR DATA_JSON MAX_LEN OUT_JSON: the model folder,
    the result path, the tokenizer, and the examples with their number of real
    tokens."""
    from transformers import AutoTokenizer

    model_dir, data_path, max_len, out_path = argv[1], argv[2], int(argv[3]), argv[4]
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = json.load(open(data_path))
    examples, real_tokens = alpaca_examples(tok, records, max_len)
    return model_dir, out_path, tok, examples, real_tokens


def train_lora(model, tok, examples, output_dir):
    """LoRA r=16 all-linear (alpha 32, dropout 0.05) on `model`, trained by
    transformers' Trainer with defaults except what the task needs (batch 4,
    one epoch, lr 2e-4, NEFTune alpha 5, on the CPU, seed 42); the result of
    train() and the seconds it took."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=2e-4,
        neftune_noise_alpha=5.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=42,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )
    t0 = time.perf_counter()
    result = trainer.train()
    return result, time.perf_counter() - t0


def write_result(out_path, start, stack, examples, real_tokens, result, train_seconds, **extra):
    """The result file: the stack, `extra`, the examples and real tokens trained
    on, the training and total seconds (since `start`) and the final loss."""
    json.dump(
        {
            "stack": stack,
            **extra,
            "examples": len(examples),
            "real_tokens": real_tokens,
            "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - start,
            "final_loss": result.training_loss,
        },
        open(out_path, "w"),
    )
