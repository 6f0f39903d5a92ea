"""Python side of the end-to-end benchmark: transformers' Trainer + PEFT as a
user runs it, defaults except what the task needs (LoRA r=16 all-linear,
alpha 32, dropout 0.05, lr 2e-4, NEFTune alpha 5, batch 4, one epoch), on the
same Alpaca records and prompt as peft-rs, completion-only labels, sequences
cut at the same length.

Usage: python bench/e2e_hf.py MODEL_DIR DATA_JSON MAX_LEN OUT_JSON
"""
import sys
import time

start = time.perf_counter()

import torch  # noqa: E402
from hf_common import setup, train_lora, write_result  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

model_dir, out_path, tok, examples, real_tokens = setup(sys.argv)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
result, train_seconds = train_lora(model, tok, examples, "/tmp/peft-rs-bench-hf")
write_result(out_path, start, "transformers+peft", examples, real_tokens, result, train_seconds)
