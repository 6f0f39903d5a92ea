"""Python side of the training-step benchmark: transformers + PEFT, LoRA r=16
all-linear, AdamW, NEFTune hook (alpha 5), on a fixed batch.

Usage: python bench/train_step.py MODEL_DIR BATCH SEQ STEPS [--random-weights] [--gradient-checkpointing]
    [--dtype fp32|bf16]
The base's dtype is --dtype (default: bf16 on CUDA, fp32 on the CPU); PEFT keeps
the adapters in fp32 either way (autocast_adapter_dtype). On CUDA it reports peak memory.
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
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
if "--dtype" in sys.argv:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[sys.argv.index("--dtype") + 1]]
torch.manual_seed(0)
if "--random-weights" in sys.argv:
    from transformers import AutoConfig
    # Initialised where it runs (a 7B model's random init on the host takes longer than the benchmark).
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
model.to(device)
if "--gradient-checkpointing" in sys.argv:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
emb = model.get_input_embeddings()
emb.neftune_noise_alpha = 5.0
emb.register_forward_hook(neftune_post_forward_hook)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
g = torch.Generator().manual_seed(1)
# Ids below 40000 (the same on both sides), and below the vocabulary (Llama 2's is 32000).
ids = torch.randint(3, min(40000, model.config.vocab_size), (batch, seq), generator=g).to(device)
mask = torch.ones_like(ids)


def step():
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()  # a host read: the step has finished


step()  # warm-up
t0 = time.perf_counter()
for _ in range(steps):
    loss = step()
dt = time.perf_counter() - t0
res = {"stack": "transformers+peft", "tokens_per_second": batch * seq * steps / dt,
       "seconds_per_step": dt / steps, "loss": loss, "threads": torch.get_num_threads(), "device": device,
       "dtype": str(dtype).removeprefix("torch.")}
if device == "cuda":
    res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(res))
