"""Python side of the generation benchmark: transformers' batched greedy
generate (left padding) on the chat prompts of a messages JSONL file.

Usage: python bench/generate_hf.py MODEL_DIR DATA_JSONL BATCH MAX_NEW_TOKENS
Prints one JSON line with prompts/s and the answers' token ids.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, data, batch, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
prompts = [
    tok.apply_chat_template(json.loads(line)["messages"][:-1], add_generation_prompt=True, tokenize=True,
                            return_dict=True)["input_ids"]
    for line in open(data)
]
pad = tok.pad_token_id if tok.pad_token_id is not None else 0
# The same grouping as peft-rs: longest prompts first.
order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
t0 = time.perf_counter()
for s in range(0, len(order), batch):
    idx = order[s:s + batch]
    width = max(len(prompts[i]) for i in idx)
    ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
    mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
secs = time.perf_counter() - t0
print(json.dumps({"stack": "transformers", "batch": batch, "prompts": len(prompts), "seconds": secs,
                  "prompts_per_second": len(prompts) / secs}))
