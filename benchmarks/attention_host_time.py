"""Host time of the Triton attention backend per layer, measured on a CPU (no GPU needed).

Every kernel launch is replaced by a stand-in that does nothing, so what is timed is the
Python around the launches: the per-step plan (built by the first layer of a step) and the
per-layer work of `triton_attention`, with the direct relaunch of compiled kernels on and
off. Separately, the cost of Triton's own JIT bookkeeping for one launch of the decode kernel
(argument binding, specialisation, cache key; what the direct relaunch skips) is timed with
Triton's real binder for a CUDA target. Shapes: 32 query / 8 KV heads, head_dim 128, bf16,
block 16, 28 layers per step. Timings on a shared machine are noisy: rounds are interleaved
and medians reported.

    python benchmarks/attention_host_time.py [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the launch checks
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmserve.attention import triton_backend  # noqa: E402
from llmserve.attention.metadata import AttentionMetadata  # noqa: E402
from llmserve.kernels import common, kv_store, paged_decode, prefill_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS = 32, 8, 128, 16, 28
DTYPE = torch.bfloat16
CASES = {
    "decode b1 ctx16k": ([1], 16384),
    "decode b64 ctx4k": ([1] * 64, 4096),
    "mixed 60 decode + 4x128 prefill": ([1] * 60 + [128] * 4, 2048),
}


class _Compiled:
    """Stands in for a compiled kernel: `kernel[grid](*args)` does nothing."""

    function = object()

    def run(self, *args: object) -> None:
        pass

    def __getitem__(self, grid: tuple):
        return lambda *args: None


class _Kernel:
    """Stands in for a JITFunction: `fn[grid](*args, **kwargs)` does nothing."""

    def __init__(self, real) -> None:
        self.arg_names = list(real.arg_names)
        self.compiled = _Compiled()

    def __getitem__(self, grid: tuple):
        return lambda *args, **kwargs: self.compiled


def stub_launches() -> None:
    for module, names in ((paged_decode, ("_decode_split_kernel", "_decode_merge_kernel")),
                          (prefill_attention, ("_extend_kernel",)),
                          (kv_store, ("_store_kv_kernel",))):
        for name in names:
            setattr(module, name, _Kernel(getattr(module, name)))


def step_inputs(q_lens: list[int], ctx: int):
    """One layer's tensors (q, k, v views of a fused qkv) and the step's metadata fields."""
    batch, n = len(q_lens), sum(q_lens)
    blocks = -(-ctx // PAGE)
    k_cache = torch.empty(batch * blocks + 1, PAGE, KV_HEADS, HEAD_DIM, dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    qkv = torch.empty(n, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=DTYPE)
    q = qkv[:, : HEADS * HEAD_DIM].view(n, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(n, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(n, KV_HEADS, HEAD_DIM)
    qsl = torch.zeros(batch + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    decodes = next((i for i, x in enumerate(q_lens) if x != 1), batch)
    fields = dict(slot_mapping=torch.zeros(n, dtype=torch.int64), query_start_loc=qsl,
                  seq_lens=torch.full((batch,), ctx, dtype=torch.int32),
                  block_tables=torch.zeros(batch, blocks, dtype=torch.int32),
                  max_query_len=max(q_lens), max_seq_len=ctx, num_decode_tokens=decodes)
    return (q, k, v, k_cache, v_cache), fields


def per_layer_us(tensors, fields, steps: int = 40) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        meta = AttentionMetadata(**fields)
        for _ in range(LAYERS):
            triton_backend.triton_attention(*tensors, meta, HEAD_DIM**-0.5)
    return (time.perf_counter() - start) / (steps * LAYERS) * 1e6


def triton_bookkeeping_us(kernel, calls: int = 2000) -> float | None:
    """Triton's binder and cache key for one decode-kernel launch (a CUDA target's rules)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import (
            JITFunction,
            compute_cache_key,
            create_function_from_signature,
        )
    except ImportError:  # another Triton layout: nothing to compare with
        return None
    # The module's kernel is the interpreter's wrapper here; rebuild the compiled-path one.
    fn = JITFunction(kernel.fn, do_not_specialize=["num_splits"])
    binder = create_function_from_signature(fn.signature, fn.params,
                                            make_backend(GPUTarget("cuda", 90, 32)))
    q = torch.empty(1, HEADS, HEAD_DIM, dtype=DTYPE)
    cache = torch.empty(64, PAGE, KV_HEADS, HEAD_DIM, dtype=DTYPE)
    ints = [torch.empty(n, dtype=torch.int32) for n in (2, 1, 1024)]
    args = (q, cache, cache, *ints, q, torch.empty(1024, HEAD_DIM), torch.empty(1024), 0.127, 32,
            4096, 128, 4096, 128, 16384, 1024, 128, 16384, 1024, 128, 1024)
    kwargs = dict(GROUP=4, HEAD_DIM=HEAD_DIM, PAGE=PAGE, SINGLE=False, BLOCK_G=16,
                  BLOCK_D=HEAD_DIM, BLOCK_N=64, IEEE=False, num_warps=4, num_stages=2,
                  debug=False)
    key_cache: dict = {}
    start = time.perf_counter()
    for _ in range(calls):
        _, specialization, options = binder(*args, **kwargs)
        compute_cache_key(key_cache, specialization, options)
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    real_kernel = paged_decode._decode_split_kernel
    stub_launches()
    fast = {"on": True}
    common.fast_launch_enabled = lambda: fast["on"]  # the stand-ins are never "interpreted"
    inputs = {name: step_inputs(*case) for name, case in CASES.items()}
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, (tensors, fields) in inputs.items():
            for mode in ("fast relaunch", "JIT every launch"):
                fast["on"] = mode == "fast relaunch"
                times.setdefault(f"{name} | {mode}", []).append(per_layer_us(tensors, fields))
    bookkeeping = [triton_bookkeeping_us(real_kernel) for _ in range(args.rounds)]
    report = {"layers_per_step": LAYERS, "rounds": args.rounds,
              "per_layer_us": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                               for k, v in times.items()},
              "triton_jit_bookkeeping_us_per_launch": (
                  statistics.median(bookkeeping) if None not in bookkeeping else None)}
    for key, row in report["per_layer_us"].items():
        print(f"{key:<52} {row['median']:7.1f} us/layer (min {row['min']:.1f}, max {row['max']:.1f})")
    if report["triton_jit_bookkeeping_us_per_launch"] is not None:
        print(f"Triton JIT bookkeeping per launch (skipped by the relaunch): "
              f"{report['triton_jit_bookkeeping_us_per_launch']:.1f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
