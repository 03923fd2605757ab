"""Fused-MoE kernel benchmark on one CUDA GPU: the Triton fused MoE against a per-expert torch loop.

Shapes: Qwen3-30B-A3B's layer (128 experts, top 8, hidden 2048, expert intermediate 768) and
Mixtral 8x7B's (8 experts, top 2, hidden 4096, intermediate 14336), bf16, 1 to 512 tokens with
random router logits. The peer is a per-expert torch loop (`ref.fused_moe_loop`, the shape of
transformers' eager experts: per hit expert, two linears on its tokens, then one index_add).
TFLOP/s counts 6 * tokens * top_k * hidden * intermediate; GB/s counts the weights of the
experts hit plus the activations read and written.
Run through `benchmarks/kernels.py --moe` (or `--moe-only`), or alone:

    PYTHONPATH=. python benchmarks/kernels_moe.py --json moe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

SHAPES = {
    "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768, renormalize=True),
    "mixtral-8x7b": dict(experts=8, top_k=2, hidden=4096, inter=14336, renormalize=True),
}
TOKENS = (1, 8, 32, 64, 128, 256, 512)
DTYPE = torch.bfloat16


def moe_weights(shape: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    experts, hidden, inter = shape["experts"], shape["hidden"], shape["inter"]
    w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=DTYPE) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, device=device, dtype=DTYPE) * inter**-0.5
    return w13, w2


def moe_case(shape: dict[str, Any], w13: torch.Tensor, w2: torch.Tensor, tokens: int,
             bench_ms: Callable[[Callable[[], Any]], float]) -> dict[str, Any]:
    """One token count: ms, TFLOP/s and GB/s of the fused kernel and of the per-expert loop."""
    from llmserve.kernels import ref
    from llmserve.kernels.fused_moe import fused_moe, moe_block_config
    from llmserve.layers.fused_moe import select_experts

    device = w13.device
    experts, top_k, hidden, inter = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    gen = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=device, dtype=DTYPE, generator=gen)
    logits = torch.randn(tokens, experts, device=device, generator=gen)
    weights, ids = select_experts(logits, top_k, shape["renormalize"], DTYPE)
    hit = int(torch.unique(ids).numel())
    flops = 6 * tokens * top_k * hidden * inter
    size = DTYPE.itemsize
    moved = (hit * 3 * inter * hidden + tokens * hidden * 2 + tokens * top_k * (hidden + 2 * inter)) * size
    ours = lambda: fused_moe(x, w13, w2, weights, ids)  # noqa: E731
    loop = lambda: ref.fused_moe_loop(x, w13, w2, weights, ids)  # noqa: E731
    ms, loop_ms = bench_ms(ours), bench_ms(loop)
    want = loop().float()
    return {
        "tokens": tokens, "experts_hit": hit, "config": moe_block_config(
            tokens, top_k, experts, hidden, inter, DTYPE),
        "ms": ms, "tflops": flops / ms / 1e9, "gbs": moved / ms / 1e6,
        "loop_ms": loop_ms, "loop_tflops": flops / loop_ms / 1e9, "loop_gbs": moved / loop_ms / 1e6,
        "speedup_vs_loop": loop_ms / ms,
        "max_rel_diff_vs_loop": float((ours().float() - want).abs().max() / want.abs().max()),
    }


def run_moe(device: torch.device, bench_ms: Callable[[Callable[[], Any]], float],
            report: dict[str, Any], save: Callable[[], None] | None = None,
            tokens: tuple[int, ...] | None = None) -> None:
    """Every shape x token count into `report`, saved after each case (a timeout keeps them)."""
    report.update(dtype=str(DTYPE).removeprefix("torch."), shapes=SHAPES)
    for name, shape in SHAPES.items():
        w13, w2 = moe_weights(shape, device)
        report[name] = []
        for n in tokens or TOKENS:
            report[name].append(moe_case(shape, w13, w2, n, bench_ms))
            print(json.dumps({"shape": name, **report[name][-1]}), flush=True)
            if save is not None:
                save()
        del w13, w2
        torch.cuda.empty_cache()


def print_moe_table(report: dict[str, Any]) -> None:
    for name in SHAPES:
        print(f"\nfused MoE, {name} {SHAPES[name]}  ({report['dtype']})")
        print(f"{'tokens':>7} {'hit':>4} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>7} {'loop ms':>8} "
              f"{'loop TF/s':>9} {'speedup':>8}")
        for r in report.get(name, []):
            print(f"{r['tokens']:>7} {r['experts_hit']:>4} {r['ms']:>8.3f} {r['tflops']:>8.1f} "
                  f"{r['gbs']:>7.0f} {r['loop_ms']:>8.3f} {r['loop_tflops']:>9.1f} "
                  f"{r['speedup_vs_loop']:>7.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the report here as JSON (rewritten after each case)")
    parser.add_argument("--quick", action="store_true", help="tokens {1, 64, 512} only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels_moe.py: no CUDA GPU here; the kernel benchmark needs one. Skipping.")
        return 0
    import triton.testing

    def bench_ms(fn: Callable[[], Any]) -> float:
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))

    report: dict[str, Any] = {}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)

    run_moe(torch.device("cuda"), bench_ms, report, save, (1, 64, 512) if args.quick else TOKENS)
    save()
    print_moe_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
