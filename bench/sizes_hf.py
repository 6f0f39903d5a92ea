"""The transformers + PEFT side of bench/sizes.sh, one measurement per run
(a fresh process each, so each peak is its own):

    sizes_hf.py train    MODEL TEXTS_JSONL TOKENS STEPS CHECKPOINTING LORA_BF16 QUANTIZE OUT_JSON
    sizes_hf.py generate MODEL NEW_TOKENS BATCH OUT_JSON
    sizes_hf.py merge    MODEL ADAPTER OUT_DIR OUT_JSON

train: the model in bf16 (QUANTIZE nf4: bitsandbytes nf4 + double quant,
bf16 compute, prepared as PEFT's prepare_model_for_kbit_training does),
LoRA r=16 alpha 32 on all linear layers, AdamW at lr 2e-4, STEPS steps of one
row of TOKENS tokens (the first TOKENS tokens of each text, labels = inputs);
LORA_BF16 1 runs the step under CPU bf16 autocast (what Trainer's bf16=True
does), 0 keeps the adapters' matmuls in fp32 (PEFT's eager default).
"""
import json
import os
import sys
import time


def memory():
    fields = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "RssAnon", "RssFile"):
            fields[k] = int(v.split()[0]) * 1024
    return fields


class Watch:
    def __init__(self):
        self.anon = self.file = 0

    def sample(self):
        m = memory()
        self.anon = max(self.anon, m["RssAnon"])
        self.file = max(self.file, m["RssFile"])

    def report(self):
        self.sample()
        return {"peak_rss_bytes": memory()["VmHWM"], "max_rss_anon_bytes": self.anon,
                "max_rss_file_bytes": self.file}


def load(model_dir, quantize=None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.bfloat16}
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def train(model_dir, texts, tokens, steps, checkpointing, lora_bf16, quantize, out):
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer

    watch = Watch()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [tok(json.loads(line)["text"])["input_ids"][:tokens] for line in open(texts)][:steps]
    assert all(len(r) == tokens for r in rows), "every text must hold TOKENS tokens"
    t0 = time.time()
    model = load(model_dir, quantize if quantize != "none" else None)
    load_seconds = time.time() - t0
    watch.sample()
    if quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = os.environ.get("SIZES_TARGETS", "all-linear")
    targets = targets if targets == "all-linear" else targets.split(",")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if lora_bf16 else contextlib.nullcontext())
    step_seconds = []
    for ids in rows:
        t = time.time()
        x = torch.tensor([ids])
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_seconds.append(time.time() - t)
        watch.sample()
    total = sum(step_seconds)
    result = {"load_seconds": load_seconds, "step_seconds": step_seconds,
              "tokens_per_second": tokens * len(rows) / total,
              "tokens_per_second_after_first": tokens * (len(rows) - 1) / max(sum(step_seconds[1:]), 1e-9),
              "final_loss": loss.item(), **watch.report()}
    json.dump(result, open(out, "w"))


def generate(model_dir, new_tokens, batch, out):
    import torch
    from transformers import AutoTokenizer

    watch = Watch()
    t0 = time.time()
    model = load(model_dir)
    load_seconds = time.time() - t0
    watch.sample()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    prompts = [f"Write a short story about the number {i}." for i in range(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    t = time.time()
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.time() - t
    made = (gen.shape[1] - enc["input_ids"].shape[1]) * batch
    json.dump({"load_seconds": load_seconds, "generate_seconds": seconds, "new_tokens": made,
               "tokens_per_second": made / seconds, **watch.report()}, open(out, "w"))


def merge(model_dir, adapter, out_dir, out):
    from peft import PeftModel

    watch = Watch()
    t0 = time.time()
    model = PeftModel.from_pretrained(load(model_dir), adapter)
    watch.sample()
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    json.dump({"merge_seconds": time.time() - t0, **watch.report()}, open(out, "w"))


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    if what == "train":
        m, texts, tokens, steps, ckpt, lbf16, q, out = args
        train(m, texts, int(tokens), int(steps), ckpt == "1", lbf16 == "1", q, out)
    elif what == "generate":
        m, n, b, out = args
        generate(m, int(n), int(b), out)
    elif what == "merge":
        m, adapter, out_dir, out = args
        merge(m, adapter, out_dir, out)
    else:
        sys.exit(f"unknown measurement {what}")
