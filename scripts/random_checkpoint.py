"""A random-weight bf16 checkpoint of a Llama-style config's shape, written
with torch alone (the GPU machine of scripts/gpu_check.sh has neither
safetensors nor transformers): one model.safetensors, laid out as the
safetensors format specifies, filled tensor by tensor through a memory map
of the file (weights N(0, 0.02), drawn on the GPU when there is one; norms
ones). Every other file of CONFIG_DIR (config.json, a tokenizer) is copied.

    python scripts/random_checkpoint.py CONFIG_DIR OUT_DIR
"""
import json
import math
import shutil
import struct
import sys
from pathlib import Path

import torch


def shapes(c):
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads)
    d = c.get("head_dim") or h // heads
    out = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    if not c.get("tie_word_embeddings", False):
        out["lm_head.weight"] = [vocab, h]
    for l in range(layers):
        p = f"model.layers.{l}."
        out.update({
            p + "self_attn.q_proj.weight": [heads * d, h], p + "self_attn.k_proj.weight": [kv * d, h],
            p + "self_attn.v_proj.weight": [kv * d, h], p + "self_attn.o_proj.weight": [h, heads * d],
            p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h], p + "mlp.down_proj.weight": [h, i],
            p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
        })
    return sorted(out.items())


def main(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    items = shapes(json.loads((src / "config.json").read_text()))
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        n = math.prod(shape) * 2
        meta[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(meta, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    start, total = 8 + len(header), 8 + len(header) + offset
    path = dst / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.truncate(total)
    storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=total)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (total,))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    for name, shape in items:
        a, b = meta[name]["data_offsets"]
        t = flat[start + a:start + b].view(torch.bfloat16).view(shape)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.copy_(torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) * 0.02)
    del flat, storage
    print(f"{path}: {len(items)} tensors, {offset / 1e9:.2f} GB")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
