"""The fastest W1 could possibly train on this machine: matmul peak / FLOPs per trained token.

LoRA training of a frozen base costs, per token, a forward matmul through every linear
layer and the vocabulary head (2 FLOPs per weight), the same again backward for the
input gradients (frozen weights need no weight gradient), plus the adapters and
attention. Dividing this machine's measured matmul rate (the W1 shapes, all cores) by
that count gives the ceiling no implementation can pass without doing less arithmetic.
`bench_train.py` results read against it show how much of the machine a framework uses.

    python benchmarks/cpu_ceiling.py [--model default] [--tokens 2048] [--rank 16] [--seq 218]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F  # noqa: N812


def matmul_gflops(rows: int, inner: int, out: int, dtype: torch.dtype) -> float:
    """Best-of-3 rate of `F.linear` (rows x inner) @ (out x inner)^T, in GFLOP/s; each timing
    repeats the matmul for about half a second (a single call where it is slower, as emulated bf16)."""
    x, w = torch.randn(rows, inner, dtype=dtype), torch.randn(out, inner, dtype=dtype)
    start = time.perf_counter()
    F.linear(x, w)
    repeats = max(1, int(0.5 / (time.perf_counter() - start)))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            F.linear(x, w)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * rows * inner * out / best / 1e9


def lora_flops_per_token(config, *, rank: int, seq: int) -> float:
    """Forward + input-gradient backward of a frozen decoder with LoRA on every linear layer."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    linear_shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    base = sum(i * o for i, o in linear_shapes) * layers + d * config.vocab_size
    adapters = sum(rank * (i + o) for i, o in linear_shapes) * layers
    attention = 2 * seq * d * layers  # QK^T and PV over a causal half, forward
    return 4 * base + 6 * adapters + 3 * 2 * attention  # fwd 2/weight, bwd dX 2/weight; adapters train (6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=2048, help="rows per matmul (tokens in a micro-batch)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=218, help="mean sequence length (W1: 218)")
    args = parser.parse_args()

    from transformers import AutoConfig

    from tunelab.models import resolve_model_source

    config = AutoConfig.from_pretrained(resolve_model_source(None if args.model == "default" else args.model))
    flops = lora_flops_per_token(config, rank=args.rank, seq=args.seq)
    d, f = config.hidden_size, config.intermediate_size
    print(f"threads: {torch.get_num_threads()}, LoRA r={args.rank}: {flops / 1e6:.0f} MFLOP per trained token")
    for dtype in (torch.float32, torch.bfloat16):
        rates = [matmul_gflops(args.tokens, i, o, dtype) for i, o in ((d, f), (f, d), (d, d))]
        peak = max(rates)
        print(f"{str(dtype).removeprefix('torch.'):>8}: matmul {' / '.join(f'{r:.0f}' for r in rates)} GFLOP/s "
              f"(d->f, f->d, d->d); ceiling at the best rate: {peak * 1e9 / flops:.0f} trained tokens/s")


if __name__ == "__main__":
    main()
