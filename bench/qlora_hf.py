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
import json
import sys
import time

start = time.perf_counter()

import torch  # noqa: E402
from hf_common import alpaca_examples  # noqa: E402
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

model_dir, data_path, max_len, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(model_dir)
records = json.load(open(data_path))

examples, real_tokens = alpaca_examples(tok, records, max_len)

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
model = get_peft_model(
    model,
    LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
)
args = TrainingArguments(
    output_dir="/tmp/peft-rs-bench-qlora-hf",
    per_device_train_batch_size=4,
    num_train_epochs=1,
    learning_rate=2e-4,
    neftune_noise_alpha=5.0,
    logging_steps=10,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    seed=42,
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=examples,
    data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
)
t0 = time.perf_counter()
result = trainer.train()
train_seconds = time.perf_counter() - t0
json.dump(
    {
        "stack": "transformers+peft+bitsandbytes",
        "frozen_weight_bytes": frozen,
        "quantized_bytes_per_param": qbytes / qparams,
        "examples": len(examples),
        "real_tokens": real_tokens,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "final_loss": result.training_loss,
    },
    open(out_path, "w"),
)
