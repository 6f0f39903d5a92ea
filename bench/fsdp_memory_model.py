"""The memory and communication model of `peft-rs train --fsdp`, per rank,
computed from a model's shapes (the README's tables come from this script).

Per rank, with N ranks and gradient checkpointing (the --fsdp default):
  frozen shards      (decoder layers + embeddings + untied head) / N, in the
                     base's bytes per parameter (bf16: 2; nf4 with double
                     quantization: 0.5 + 1/64 + 4·4/(64·256) bytes, bitsandbytes'
                     layout; embeddings and head stay bf16, as with --quantize)
  gathered layers    two whole decoder layers (the one computing and the next,
                     prefetched) plus the gather buffer of one; a 4-bit layer is
                     gathered packed and dequantized one linear at a time
  embeddings, head   never whole: used sharded by vocabulary rows; the rows of
                     every rank travel instead (N x batch x seq x hidden, bf16,
                     and the exchanged hidden rows' fp32 gradient)
  adapters           LoRA r=16 on every linear layer, fp32: weights on every rank
                     (4 bytes per parameter); gradients and AdamW's two moments
                     sharded over the ranks (4/N + 8/N bytes: --shard-optimizer-state,
                     on with --fsdp; with checkpointing each layer's gradients
                     are summed as the backward pass leaves it, so one layer's
                     whole gradients are in flight)
  activations        each layer's input (batch x seq x hidden, bf16) kept for the
                     recompute, one layer's activations while it is recomputed
                     (34 x batch x seq x hidden bytes, Korthikanti et al. with a
                     fused attention, no seq^2 term), and the cross-entropy's two
                     fp32 chunks of 256 rows x vocab / N
  runtime            CUDA context and allocator slack, 1.5 GB (an assumption)
Communication per rank and micro-batch: an all-gather receives (N-1)/N of
each unit, every layer twice (forward and recompute); the embedding lookup
and the loss move every rank's rows (a few MB).
  python3 bench/fsdp_memory_model.py
"""

GB = 1e9
MODELS = {
    # name: (layers, hidden, intermediate, kv_dim, vocab, tied)
    "Llama-3.1-8B": (32, 4096, 14336, 1024, 128256, False),
    "Llama-3.1-70B": (80, 8192, 28672, 1024, 128256, False),
    "Llama-3.1-405B": (126, 16384, 53248, 1024, 128256, False),
}
NF4_DQ = 0.5 + 1 / 64 + 4 * 4 / (64 * 256)  # packed codes, uint8 absmax, nested fp32 absmax
LINEARS = lambda h, i, kv: [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out)
RANK = 16
RUNTIME = 1.5 * GB


def per_rank(name, world, seq, batch=1, quant=False):
    layers, h, i, kv, vocab, tied = MODELS[name]
    lin = LINEARS(h, i, kv)
    layer_params = sum(a * b for a, b in lin)
    bpp = NF4_DQ if quant else 2.0
    embed = vocab * h * 2.0
    head = 0.0 if tied else embed
    frozen = (layers * layer_params * bpp + embed + head) / world
    largest_linear = max(a * b for a, b in lin) * 2.0
    gathered = 3 * layer_params * bpp + (largest_linear if quant else 0.0)
    tokens = batch * seq
    exchanged = world * tokens * h * (2.0 + 4.0) if world > 1 else 0.0
    if world == 1:  # nothing is sharded, nothing gathered
        gathered = 0.0
    layer_adapter = sum(RANK * (a + b) for a, b in lin)
    in_flight = layer_adapter * 4.0 if world > 1 else 0.0
    adapters = layers * layer_adapter * (4.0 + 12.0 / world) + in_flight
    acts = layers * tokens * h * 2.0 + 34 * tokens * h + 2 * 256 * vocab / world * 4.0 + exchanged
    total = frozen + gathered + adapters + acts + RUNTIME
    moved = (world - 1) / world * 2 * layers * layer_params * bpp + exchanged
    return dict(frozen=frozen, gathered=gathered, adapters=adapters,
                acts=acts, total=total, moved=moved, flops=6 * batch * seq * (layers * layer_params))


def main():
    devices = [24, 48, 80, 141]
    print("Per-rank memory (GB) of `peft-rs train --fsdp`, LoRA r=16 all-linear, batch 1, checkpointing")
    print(f"{'model':16}{'base':6}{'seq':>6}" + "".join(f"{f'N={n}':>8}" for n in (1, 2, 4, 8))
          + "   smallest N per device " + " ".join(f"{d}GB" for d in devices))
    for name in MODELS:
        for quant in (False, True):
            for seq in (2048,):
                row = [per_rank(name, n, seq, quant=quant)["total"] / GB for n in (1, 2, 4, 8)]
                fits = []
                for d in devices:
                    n = next((n for n in (1, 2, 4, 8, 16, 32) if per_rank(name, n, seq, quant=quant)["total"] / GB <= d), None)
                    fits.append(f"{n if n else '>32':>4}")
                print(f"{name:16}{'nf4' if quant else 'bf16':6}{seq:6}" + "".join(f"{v:8.1f}" for v in row)
                      + "   " + " ".join(fits))
    print()
    print("Where it goes, N=2, seq 2048 (GB): frozen shards / gathered layers / adapters+AdamW / activations")
    for name in MODELS:
        for quant in (False, True):
            r = per_rank(name, 2, 2048, quant=quant)
            print(f"  {name:16}{'nf4' if quant else 'bf16':5} {r['frozen'] / GB:7.1f} {r['gathered'] / GB:7.1f} "
                  f"{r['adapters'] / GB:7.1f} {r['acts'] / GB:7.1f}")
    print()
    print("All-gather volume per rank and micro-batch, and its time against the step's compute")
    print("(N=8, batch 1 x 2048 tokens; compute 6·params·tokens at 50% of an H100/H200's 989 TFLOP/s bf16)")
    for name in MODELS:
        for quant in (False, True):
            r = per_rank(name, 8, 2048, quant=quant)
            compute = r["flops"] / (0.5 * 989e12)
            nvlink, ib = r["moved"] / 350e9, r["moved"] / 50e9
            print(f"  {name:16}{'nf4' if quant else 'bf16':5} {r['moved'] / GB:7.1f} GB: NVLink (350 GB/s) {nvlink * 1e3:7.0f} ms, "
                  f"InfiniBand 400 Gb/s {ib * 1e3:7.0f} ms; compute {compute * 1e3:7.0f} ms")


if __name__ == "__main__":
    main()
