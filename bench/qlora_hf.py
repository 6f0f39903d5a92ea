"""Python side of the QLoRA benchmark: transformers' Trainer + PEFT on a
bitsandbytes 4-bit base as the QLoRA recipe sets it up (BitsAndBytesConfig
load_in_4bit, nf4, double quantization, compute dtype float32 on the CPU;
prepare_model_for_kbit_training, which turns on gradient checkpointing), with
the settings of bench/e2e_hf.py (LoRA r=16 all-linear, alpha 32, dropout
0.05, lr 2e-4, NEFTune alpha 5, batch 4, one epoch), on the same records.

Usage: python bench/qlora_hf.py MODEL_DIR DATA_JSON MAX_LEN OUT_JSON
Writes tokens/s and the bytes of the frozen weights (4-bit layers as
bitsandbytes holds them: packed data plus every QuantState tensor).
"""
import sys
import time

start = time.perf_counter()

import torch  # noqa: E402
from hf_common import setup, train_lora, write_result  # noqa: E402
from peft import prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

model_dir, out_path, tok, examples, real_tokens = setup(sys.argv)

qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=qc, device_map="cpu")


def frozen_bytes(m):
    total, qbytes, qparams = 0, 0, 0
    seen = set()
    for p in m.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        b = p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            b += sum(t.numel() * t.element_size() for t in (qs.absmax, qs.code))
            if qs.nested:
                b += sum(t.numel() * t.element_size() for t in (qs.state2.absmax, qs.state2.code, qs.offset))
            qbytes += b
            qparams += qs.shape.numel()
        total += b
    return total, qbytes, qparams


frozen, qbytes, qparams = frozen_bytes(model)
model = prepare_model_for_kbit_training(model)
result, train_seconds = train_lora(model, tok, examples, "/tmp/peft-rs-bench-qlora-hf")
write_result(out_path, start, "transformers+peft+bitsandbytes", examples, real_tokens, result, train_seconds,
             frozen_weight_bytes=frozen, quantized_bytes_per_param=qbytes / qparams)
