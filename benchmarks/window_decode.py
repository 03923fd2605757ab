"""CPU decode attention with and without a sliding window (the native C kernel's path).

Times one layer's decode attention for `--seqs` sequences of `--context` tokens each, full
context against a `--window`, in interleaved rounds, and prints JSON plus a table. A windowed
layer reads only the window's blocks, so its time should follow the window, not the context.

    python benchmarks/window_decode.py [--context 4096 --window 512 --seqs 8 --rounds 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from llmserve.kernels import cpu_attention, cpu_native


def _time_layer(q, k_cache, v_cache, plan, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        cpu_attention.paged_attention_planned(q, k_cache, v_cache, plan, 0.125)
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()

    torch.manual_seed(0)
    block, kv_heads, group, dim = 16, 2, 4, 64
    num_blocks = args.seqs * args.context // block
    k_cache = torch.randn(num_blocks, block, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim)
    q = torch.randn(args.seqs, kv_heads * group, dim)
    tables = torch.randperm(num_blocks).view(args.seqs, -1).int()
    qsl = torch.arange(args.seqs + 1).int()
    lens = torch.full((args.seqs,), args.context).int()
    native = cpu_native.load() is not None
    times: dict[str, list[float]] = {"full": [], "window": []}
    for _ in range(args.rounds):
        for name, window in (("full", None), ("window", args.window)):
            plan = cpu_attention.plan_paged_attention(qsl, lens, tables, block, native=True,
                                                      num_decodes=args.seqs, window=window)
            times[name].append(_time_layer(q, k_cache, v_cache, plan, args.reps))
    report = {
        "what": "CPU decode attention, ms per layer-step, full context vs sliding window",
        "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
        "cpu_threads": torch.get_num_threads(), "native_kernel": native,
        "config": vars(args),
        "median_ms": {k: statistics.median(v) for k, v in times.items()},
        "rounds_ms": times,
    }
    print(json.dumps(report, indent=2))
    print(f"\n{'attention':<12}{'median ms':>12}{'min':>10}{'max':>10}")
    for name, values in times.items():
        print(f"{name:<12}{statistics.median(values):>12.3f}{min(values):>10.3f}{max(values):>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
