"""Reads bench/sizes.sh's results folder and prints its tables:

    sizes_report.py RESULTS_DIR STEPS SHAPE...

Theoretical training peak = baseline (a process that loaded libtorch) +
weights (bf16, as stored) + adapters (fp32 parameter, gradient and two AdamW
moments: 16 bytes each) + activations by formula + the loss's logits chunk
(--loss-chunk-size rows of vocabulary-wide logits in bf16, which become their
own gradient in place).
Activations kept per token and decoder layer, in bytes, as peft-rs keeps
them (bf16 base; h hidden, kv key/value width, i intermediate size):
  without checkpointing, fp32 adapters: 24 h + 4 kv + 12 i
    (two RMS norms, fused: their bf16 inputs 2 h each and one fp32 number a
    row; the q/k/v, o, gate/up and down inputs; rotated q and k, v; attention
    output; gate, up and their product; the adapters' fp32 copies of their
    inputs 12 h + 4 i)
  bf16 adapters: 12 h + 4 kv + 8 i (no fp32 copies)
  with checkpointing: each layer's input (2 h) for every layer, plus one
    layer's activations during its recompute; keeping the MLP's frozen
    products (--gradient-checkpointing-keep-mlp) adds the gate and up
    products (4 i) for every layer, keeping the attention's too
    (--gradient-checkpointing-keep-attention) the q, k, v and o products
    (2 q + 4 kv + 2 h).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

d, steps, shapes = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
GB = 1e9


def loss_chunk(name):
    """The run's --loss-chunk-size (peft-rs's default where the run kept no settings)."""
    p = d / f"{name}.args.json"
    return json.loads(p.read_text())["loss_chunk_size"] if p.exists() else 256


def load(name):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def time_file(name):
    p = d / f"{name}.time"
    if not p.exists():
        return None
    kib, wall = p.read_text().split()[-2:]
    return int(kib) * 1024, float(wall)


def stderr_of(name):
    p = d / f"{name}.err"
    return p.read_text() if p.exists() else ""


def bf16_rate(m, k, n):
    """This machine's bf16 matmul rate on an m x k @ k x n product, GFLOP/s."""
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    a @ b
    best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(3))
    return 2 * m * k * n / best / 1e9


baseline = time_file("baseline")[0]
print((d / "cpu.txt").read_text().strip())
print(f"baseline (a process with libtorch loaded, `peft-rs env`): {baseline / GB:.2f} GB peak RSS")

for shape in shapes:
    cfg = json.loads((d / f"{shape}.config.json").read_text())
    weights = json.loads((d / f"{shape}.index.json").read_text())["metadata"]["total_size"]
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv, vocab = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["vocab_size"]
    r = 16
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if experts:
        # A mixture of experts: the parameters a token passes through (its
        # top-k experts and the router). LoRA on attention, and with
        # all-linear on Qwen3-MoE/Mixtral (as PEFT resolves it there) on the
        # router and every expert too (gate_up_proj at rank 2r).
        width = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        i = cfg["num_experts_per_tok"] * width
        linear = L * (h * q + 2 * h * kv + q * h + 3 * h * i + h * experts) + h * vocab
        lora = L * r * ((h + q) + 2 * (h + kv) + (q + h))
        if os.environ.get("SIZES_TARGETS", "all-linear") == "all-linear" and cfg["model_type"] != "gpt_oss":
            lora += L * r * ((h + experts) + 2 * experts * (h + 2 * width) + experts * (width + h))
    else:
        linear = L * (h * q + 2 * h * kv + q * h + 3 * h * i) + h * vocab  # incl. lm_head
        lora = L * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    rate = bf16_rate(512, h, i)
    print(f"\n== {shape}: {weights / GB:.2f} GB bf16, {linear / 1e9:.2f} B linear parameters, "
          f"LoRA r=16 {lora / 1e6:.1f} M; bf16 matmul here on {512}x{h}x{i}: {rate:.0f} GFLOP/s")
    print(f"{'run':36}{'stack':10}{'tok/s':>8}{'MFU':>6}{'peak GB':>9}{'anon':>7}{'file':>7}{'theory':>8}"
          f"{'meas/th':>8}{'tok/s x':>9}{'peak x':>8}")
    for t in (512, 2048, 1024, 4096):
        # keep: None, "mlp" (--gradient-checkpointing-keep-mlp), "all" (and -keep-attention)
        for gc, keep in ((1, None), (1, "mlp"), (1, "all"), (0, None)):
            for ld in ("fp32", "bf16"):
                suffix = {None: "", "mlp": ".keep", "all": ".keepall"}[keep]
                rust = load(f"{shape}.train.{t}.gc{gc}.{ld}{suffix}")
                hf = load(f"{shape}.hf-train.{t}.gc{gc}.{ld}")
                if not rust and (keep or not hf):
                    continue
                per_layer = (24 * h + 4 * kv + 12 * i) if ld == "fp32" else (12 * h + 4 * kv + 8 * i)
                saved = 2 * h + (4 * i if keep else 0) + (2 * q + 4 * kv + 2 * h if keep == "all" else 0)
                acts = t * (L * saved + per_layer) if gc else t * L * per_layer
                chunk = loss_chunk(f"{shape}.train.{t}.gc{gc}.{ld}{suffix}")
                theory = baseline + weights + 16 * lora + acts + 2 * min(t, chunk) * vocab
                # The recompute of the kept products is not done.
                recomputed = linear - h * vocab - (L * 2 * h * i if keep else 0)
                if keep == "all":
                    recomputed -= L * (h * q + 2 * h * kv + q * h)
                flops_tok = 4 * linear + 2 * gc * recomputed + (3 + gc) * 2 * t * q * L
                mode = f"keep-{keep}" if keep else ("on" if gc else "off")
                label = f"{t} tok, ckpt {mode}, LoRA {ld}"
                for stack, j in (("peft-rs", rust), ("HF+PEFT", None if keep else hf)):
                    if keep and stack != "peft-rs":
                        continue
                    if not j:
                        print(f"{label:36}{stack:10}{'failed (see .err)':>40}")
                        continue
                    tps = j["tokens_per_second"]
                    peak = j["peak_rss_bytes"]
                    ratio = ""
                    if stack == "peft-rs" and hf:
                        ratio = f"{tps / hf['tokens_per_second']:9.2f}{peak / hf['peak_rss_bytes']:8.2f}"
                    print(f"{label:36}{stack:10}{tps:8.1f}{tps * flops_tok / (rate * 1e9):6.0%}{peak / GB:9.2f}"
                          f"{j['max_rss_anon_bytes'] / GB:7.2f}{j['max_rss_file_bytes'] / GB:7.2f}"
                          f"{theory / GB:8.2f}{peak / theory:8.2f}{ratio}")
    for kind in ("qlora",):
        for t in (512, 1024, 2048):
            rust, hf = load(f"{shape}.{kind}.{t}"), load(f"{shape}.hf-{kind}.{t}")
            if rust or hf:
                for stack, j in (("peft-rs", rust), ("HF+PEFT+bnb", hf)):
                    if j:
                        print(f"QLoRA nf4+dq {t} tok, ckpt on      {stack:12}{j['tokens_per_second']:8.1f} tok/s, "
                              f"peak {j['peak_rss_bytes'] / GB:.2f} GB (anon {j['max_rss_anon_bytes'] / GB:.2f}, "
                              f"file {j['max_rss_file_bytes'] / GB:.2f}); bf16 size of the model {weights / GB:.2f} GB")
    m, hm = time_file(f"{shape}.merge"), load(f"{shape}.hf-merge")
    largest = max(h * vocab, i * h) * 2
    if m:
        print(f"merge: peft-rs {m[1]:.1f} s, peak {m[0] / GB:.2f} GB (bound: baseline + 3 x largest tensor "
              f"{(baseline + 3 * largest) / GB:.2f} GB)"
              + (f"; HF+PEFT {hm['merge_seconds']:.1f} s, peak {hm['peak_rss_bytes'] / GB:.2f} GB" if hm else ""))
    for b in (1, 8):
        g, hg = time_file(f"{shape}.generate.{b}"), load(f"{shape}.hf-generate.{b}")
        if not g:
            continue
        err = stderr_of(f"{shape}.generate.{b}")
        tps = next((float(x.split("(")[1].split()[0]) for x in err.splitlines() if "new tokens in" in x), float("nan"))
        load_s = next((float(x.split("loaded in ")[1].split()[0]) for x in err.splitlines() if "loaded in" in x),
                      float("nan"))
        line = f"generate batch {b}: peft-rs load {load_s:.1f} s, {tps:.1f} tok/s, peak {g[0] / GB:.2f} GB"
        if hg:
            line += (f"; HF load {hg['load_seconds']:.1f} s, {hg['tokens_per_second']:.1f} tok/s, "
                     f"peak {hg['peak_rss_bytes'] / GB:.2f} GB")
        print(line)
