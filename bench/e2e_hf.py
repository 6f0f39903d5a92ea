"""Python side of the end-to-end benchmark: transformers' Trainer + PEFT as a
user runs it, defaults except what the task needs (LoRA r=16 all-linear,
alpha 32, dropout 0.05, lr 2e-4, NEFTune alpha 5, batch 4, one epoch), on the
same Alpaca records and prompt as peft-rs, completion-only labels, sequences
cut at the same length.

Usage: python bench/e2e_hf.py MODEL_DIR DATA_JSON MAX_LEN OUT_JSON
"""
import json
import sys
import time

start = time.perf_counter()

import torch  # noqa: E402
from hf_common import alpaca_examples  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

model_dir, data_path, max_len, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(model_dir)
records = json.load(open(data_path))

examples, real_tokens = alpaca_examples(tok, records, max_len)

model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = get_peft_model(
    model,
    LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
)
args = TrainingArguments(
    output_dir="/tmp/peft-rs-bench-hf",
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
train_seconds = time.perf_counter() - t0
json.dump(
    {
        "stack": "transformers+peft",
        "examples": len(examples),
        "real_tokens": real_tokens,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "final_loss": result.training_loss,
    },
    open(out_path, "w"),
)
