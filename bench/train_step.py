"""Python side of the training-step benchmark: transformers + PEFT, LoRA r=16
all-linear, AdamW, NEFTune hook (alpha 5), on a fixed batch.

Usage: python bench/train_step.py MODEL_DIR BATCH SEQ STEPS
Prints one JSON line: {"stack": "transformers+peft", "tokens_per_second": ..., ...}
"""
import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations.neftune import neftune_post_forward_hook

model_dir, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
emb = model.get_input_embeddings()
emb.neftune_noise_alpha = 5.0
emb.register_forward_hook(neftune_post_forward_hook)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 40000, (batch, seq), generator=g)
mask = torch.ones_like(ids)


def step():
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


step()  # warm-up
t0 = time.perf_counter()
for _ in range(steps):
    loss = step()
dt = time.perf_counter() - t0
print(json.dumps({"stack": "transformers+peft", "tokens_per_second": batch * seq * steps / dt,
                  "seconds_per_step": dt / steps, "loss": loss, "threads": torch.get_num_threads()}))
