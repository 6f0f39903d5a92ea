"""Writes a random-weight checkpoint of a real model's shape, as the Hub
stores it: config.json from transformers' own config class, bf16
safetensors in shards of at most 5 GB with their index, and the default
model's tokenizer and chat template (a real tokenizer; its ids are a subset
of the big vocabulary). Weights are N(0, 0.02), norms ones: the numbers are
meaningless, the shapes, bytes and layout are those of the real model.

    python bench/make_checkpoint.py SHAPE OUT_DIR [TOKENIZER_DIR]

SHAPE: llama-3.2-1b, qwen3-1.7b, llama-2-7b, llama-3.1-8b, qwen3-moe-small
(a small mixture of experts: 8 experts, top 2, hidden 512; stored with the
experts fused, as transformers 5's state dict names them), gpt-oss-small (the
same size in gpt-oss's layout).
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
               "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters=LLAMA3_ROPE),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000,
                       tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters=LLAMA3_ROPE),
    "qwen3-moe-small": dict(model_type="qwen3_moe", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=49152,
                            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768, norm_topk_prob=True,
                            tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # gpt-oss's layout at the size of the small MoE above: attention sinks,
    # sliding and full layers alternating (window 128), YaRN (the config's
    # default), transposed experts with biases.
    "gpt-oss-small": dict(model_type="gpt_oss", hidden_size=512, intermediate_size=768, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=49152,
                          num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
                          max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=128),
}
SHARD_BYTES = 5 * 10**9


def main():
    shape, out = sys.argv[1], Path(sys.argv[2])
    tok = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("models/SmolLM2-135M-Instruct")
    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        print(f"{out}: reusing the checkpoint written earlier")
        return
    spec = dict(SHAPES[shape])
    # The tokenizer's ids must index the embeddings: a shape whose vocabulary
    # is smaller than the tokenizer's (Llama-2's 32,000 against SmolLM2's
    # 49,152) takes the tokenizer's size, and says so.
    tok_vocab = len(json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"])
    if spec["vocab_size"] < tok_vocab:
        print(f"{shape}: vocab_size {spec['vocab_size']} raised to the tokenizer's {tok_vocab}")
        spec["vocab_size"] = tok_vocab
    config = AutoConfig.for_model(spec.pop("model_type"), torch_dtype="bfloat16", bos_token_id=1,
                                  eos_token_id=2, pad_token_id=2, **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    names = [(k, v.shape) for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Plan the shards from the shapes, then write each as it is made, so that
    # at most one shard is ever in memory.
    plan, size = [[]], 0
    for name, shp in names:
        nbytes = shp.numel() * 2
        if plan[-1] and size + nbytes > SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append((name, shp))
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shard in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name, shp in shard:
            tensors[name] = (torch.ones(shp, dtype=torch.bfloat16) if name.endswith("norm.weight")
                             else (torch.randn(shp, generator=gen) * 0.02).to(torch.bfloat16))
            weight_map[name] = file
            total += shp.numel() * 2
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tok / f).exists():
            shutil.copy(tok / f, tmp / f)
    tmp.rename(out)
    print(f"{out}: {shape}, {total / 1e9:.2f} GB of bf16 weights in {len(plan)} shards")


if __name__ == "__main__":
    main()
