"""Kernel benchmarks on one CUDA GPU: paged decode attention against the copy roofline, prefill.

Decode: achieved GB/s of the split-KV paged decode kernel (K/V bytes read per call / time) and
its share of the machine's measured device-to-device copy bandwidth, at batch {1,16,64,256} x
context {512,4096,16384}, 32 query / 8 KV heads, head_dim 128, bf16, block size 16; torch SDPA
(flash, GQA) on the same shapes over contiguous K/V is the peer. Prefill/extend: TFLOP/s of
the extend kernel against SDPA. `--tune` adds a small sweep of launch configurations.
Host overhead: microseconds of host time per attention call (one-shot wrapper, a step's plan
reused by a layer, the Triton backend per layer), against the kernel's own time.
`--moe` adds the fused-MoE kernel against a per-expert torch loop (see kernels_moe.py).

    PYTHONPATH=. python benchmarks/kernels.py --json out.json [--tune] [--quick] [--moe | --moe-only]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
BATCHES, CONTEXTS = (1, 16, 64, 256), (512, 4096, 16384)
PREFILL = [(1, 4096, 0), (4, 2048, 0), (16, 512, 0), (8, 512, 2048)]  # (batch, q_len, prefix)


def bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds per call (Triton's do_bench flushes L2 between calls)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth: bytes read + written per second for a 2 GiB copy."""
    src = torch.empty(1 << 30, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench_ms(functools.partial(dst.copy_, src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def release() -> None:
    """Give freed cache blocks back so the next (larger) case can allocate."""
    gc.collect()
    torch.cuda.empty_cache()


def fits(nbytes: int, device: torch.device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.8 * free


def paged_kv(batch: int, ctx: int, device: torch.device, shuffle: bool = True):
    """A cache holding `batch` sequences of `ctx` tokens; tables shuffled like a busy pool."""
    blocks = batch * (-(-ctx // PAGE))
    k_cache = torch.randn(blocks, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    ids = torch.randperm(blocks, device=device) if shuffle else torch.arange(blocks, device=device)
    return k_cache, v_cache, ids.view(batch, -1).to(torch.int32)


def decode_case(batch: int, ctx: int, copy_gbs: float, device: torch.device) -> dict[str, Any]:
    from llmserve.kernels.paged_decode import DecodePlan, paged_decode_attention

    kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    row: dict[str, Any] = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes}
    if not fits(kv_bytes, device):
        return {**row, "skipped": "does not fit in free GPU memory"}
    k_cache, v_cache, tables = paged_kv(batch, ctx, device)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    out, scale = torch.empty_like(q), HEAD_DIM**-0.5

    def ours(table: torch.Tensor = tables) -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, qsl, seq_lens, table, scale, out=out,
                                      max_seq_len=ctx)

    ms = bench_ms(ours)
    # A layer of a step: the plan (split count, grids, scratch) made once, as the backend does.
    plan = DecodePlan(q, k_cache, v_cache, qsl, seq_lens, tables, max_seq_len=ctx)
    planned_ms = bench_ms(functools.partial(plan.run, q, k_cache, v_cache, out, scale))
    moved = kv_bytes + 2 * q.numel() * q.element_size() + tables.numel() * 4
    row.update(ms=ms, gbs=moved / ms / 1e6, pct_of_copy=100 * moved / ms / 1e6 / copy_gbs,
               planned_ms=planned_ms, planned_pct_of_copy=100 * moved / planned_ms / 1e6 / copy_gbs,
               num_splits=plan.num_splits)
    # Peer: SDPA over the same memory read as contiguous [batch, kv_heads, ctx, head_dim].
    k = k_cache.view(batch, -1, KV_HEADS, HEAD_DIM)[:, :ctx].transpose(1, 2)
    v = v_cache.view(batch, -1, KV_HEADS, HEAD_DIM)[:, :ctx].transpose(1, 2)
    q4 = q.view(batch, HEADS, 1, HEAD_DIM)
    try:
        sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)  # noqa: E731
        sdpa_ms = bench_ms(sdpa)
        row.update(sdpa_ms=sdpa_ms, sdpa_gbs=moved / sdpa_ms / 1e6)
        identity = torch.arange(tables.numel(), device=device, dtype=torch.int32).view_as(tables)
        row["max_abs_diff_vs_sdpa"] = float((ours(identity).float() - sdpa()[:, :, 0].float()).abs().max())
    except (RuntimeError, TypeError) as exc:  # an SDPA build without GQA support
        row["sdpa_error"] = str(exc)[:200]
    return row


def prefill_case(batch: int, q_len: int, prefix: int, device: torch.device) -> dict[str, Any]:
    from llmserve.kernels.prefill_attention import extend_attention

    ctx = prefix + q_len
    row: dict[str, Any] = {"batch": batch, "q_len": q_len, "prefix": prefix}
    if not fits(3 * batch * ctx * KV_HEADS * HEAD_DIM * DTYPE.itemsize, device):
        return {**row, "skipped": "does not fit in free GPU memory"}
    k_cache, v_cache, tables = paged_kv(batch, ctx, device, shuffle=False)
    q = torch.randn(batch * q_len, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    qsl = torch.arange(0, batch * q_len + 1, q_len, device=device, dtype=torch.int32)
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    out, scale = torch.empty_like(q), HEAD_DIM**-0.5
    pairs = batch * (q_len * prefix + q_len * (q_len + 1) // 2)  # causal (query, key) pairs
    flops = 4 * pairs * HEADS * HEAD_DIM

    def ours() -> torch.Tensor:
        return extend_attention(q, k_cache, v_cache, qsl, seq_lens, tables, scale,
                                max_query_len=q_len, out=out)

    ms = bench_ms(ours)
    row.update(ms=ms, tflops=flops / ms / 1e9)
    k = k_cache.view(batch, -1, KV_HEADS, HEAD_DIM)[:, :ctx].transpose(1, 2)
    v = v_cache.view(batch, -1, KV_HEADS, HEAD_DIM)[:, :ctx].transpose(1, 2)
    q4 = q.view(batch, q_len, HEADS, HEAD_DIM).transpose(1, 2)
    # Bottom-right aligned causal mask when there is a prefix (SDPA's is_causal is top-left).
    mask = None
    if prefix:
        mask = torch.ones(q_len, ctx, device=device, dtype=torch.bool).tril(diagonal=prefix)
    try:
        sdpa = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q4, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
        sdpa_ms = bench_ms(sdpa)
        row.update(sdpa_ms=sdpa_ms, sdpa_tflops=flops / sdpa_ms / 1e9)
        want = sdpa().transpose(1, 2).reshape(out.shape)
        row["max_abs_diff_vs_sdpa"] = float((ours().float() - want.float()).abs().max())
    except (RuntimeError, TypeError) as exc:
        row["sdpa_error"] = str(exc)[:200]
    return row


def host_us_per_call(fn: Callable[[], Any], device: torch.device, calls: int = 100) -> float:
    """Host microseconds per call, with the device kept busy so that it never waits for us.

    A long device sleep goes first, so every launch of the timed calls only queues: the wall
    time of the loop is the host's own cost (wrapper Python, Triton's launch path, driver).
    """
    fn()
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(3):
        torch.cuda._sleep(400_000_000)  # ~0.2 s at 2 GHz: longer than the loop below
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize(device)
    return best


def graph_ms(fn: Callable[[], Any], device: torch.device, replays: int = 200) -> float:
    """Device milliseconds per call from CUDA-graph replays (no host work between kernels)."""
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / replays


def host_overhead_case(batch: int, ctx: int, device: torch.device) -> dict[str, Any]:
    """Host cost of one attention call: the one-shot wrapper, a step's plan reused by a layer,
    and the Triton backend per layer (K/V store + decode), each with and without the direct
    relaunch of compiled kernels; with the kernel's own time (graph replay) beside them."""
    from llmserve.attention.metadata import AttentionMetadata
    from llmserve.attention.triton_backend import triton_attention
    from llmserve.kernels.paged_decode import DecodePlan, paged_decode_attention

    scale = HEAD_DIM**-0.5
    k_cache, v_cache, tables = paged_kv(batch, ctx, device)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    k = torch.randn(batch, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    slots = (tables[:, -1].long() * PAGE + PAGE - 1).contiguous()  # the last slot of each row
    out = torch.empty_like(q)
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens,
                             block_tables=tables, max_query_len=1, max_seq_len=ctx,
                             num_decode_tokens=batch)
    row: dict[str, Any] = {"batch": batch, "context": ctx}
    plan = None
    for fast in ("1", "0"):
        os.environ["LLMSERVE_TRITON_FAST_LAUNCH"] = fast
        meta.backend_cache.clear()
        plan = DecodePlan(q, k_cache, v_cache, qsl, seq_lens, tables, max_seq_len=ctx)
        calls = {
            "wrapper": functools.partial(paged_decode_attention, q, k_cache, v_cache, qsl,
                                         seq_lens, tables, scale, out=out, max_seq_len=ctx),
            "planned": functools.partial(plan.run, q, k_cache, v_cache, out, scale),
            "backend_layer": functools.partial(triton_attention, q, k, k, k_cache, v_cache,
                                               meta, scale),
        }
        suffix = "" if fast == "1" else "_jit_only"
        for name, fn in calls.items():
            row[f"{name}_host_us{suffix}"] = host_us_per_call(fn, device)
    os.environ.pop("LLMSERVE_TRITON_FAST_LAUNCH", None)
    row["kernel_ms_graph"] = graph_ms(
        functools.partial(plan.run, q, k_cache, v_cache, out, scale), device)
    row["num_splits"] = plan.num_splits
    return row


def host_overhead(device: torch.device) -> list[dict[str, Any]]:
    """`host_overhead_case` at batch 1 / 16k context and batch 64 / 4k."""
    rows = []
    for batch, ctx in ((1, 16384), (64, 4096)):
        rows.append(host_overhead_case(batch, ctx, device))
        release()
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tune(device: torch.device, results: dict[str, list[dict[str, Any]]],
         save: Callable[[], None]) -> None:
    """Time a few launch configurations so the defaults can be revisited with data.

    Results are appended to `results` and saved after each one (a timeout keeps what ran).
    """
    from llmserve.kernels.paged_decode import paged_decode_attention
    from llmserve.kernels.prefill_attention import extend_attention

    results.update({"decode_b64_c4096": [], "decode_b1_c16384": [], "prefill_b4_q2048": []})
    scale = HEAD_DIM**-0.5
    for batch, ctx, key, configs in (
        (64, 4096, "decode_b64_c4096",
         [dict(block_n=n, num_warps=w, num_stages=s) for n in (32, 64, 128) for w in (4, 8)
          for s in (2, 3)]),
        (1, 16384, "decode_b1_c16384", [dict(num_splits=s) for s in (8, 16, 32, 64, 128)]),
    ):
        k_cache, v_cache, tables = paged_kv(batch, ctx, device)
        q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
        qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
        seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
        moved = 2 * batch * ctx * KV_HEADS * HEAD_DIM * DTYPE.itemsize
        for cfg in configs:
            call = functools.partial(paged_decode_attention, q, k_cache, v_cache, qsl, seq_lens,
                                     tables, scale, max_seq_len=ctx, **cfg)
            try:
                ms = bench_ms(call)
                results[key].append({**cfg, "ms": ms, "gbs": moved / ms / 1e6})
            except Exception as exc:  # noqa: BLE001 - a config may not fit this GPU
                results[key].append({**cfg, "error": str(exc)[:200]})
            save()
        del k_cache, v_cache, call
        release()
    batch, q_len = 4, 2048
    k_cache, v_cache, tables = paged_kv(batch, q_len, device, shuffle=False)
    q = torch.randn(batch * q_len, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    qsl = torch.arange(0, batch * q_len + 1, q_len, device=device, dtype=torch.int32)
    seq_lens = torch.full((batch,), q_len, device=device, dtype=torch.int32)
    flops = 4 * batch * q_len * (q_len + 1) // 2 * HEADS * HEAD_DIM
    for m, n, w, s in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                       (128, 32, 4, 3), (64, 32, 4, 4)):
        cfg = dict(block_m=m, block_n=n, num_warps=w, num_stages=s)
        call = functools.partial(extend_attention, q, k_cache, v_cache, qsl, seq_lens, tables,
                                 scale, max_query_len=q_len, **cfg)
        try:
            ms = bench_ms(call)
            results["prefill_b4_q2048"].append({**cfg, "ms": ms, "tflops": flops / ms / 1e9})
        except Exception as exc:  # noqa: BLE001
            results["prefill_b4_q2048"].append({**cfg, "error": str(exc)[:200]})
        save()


def print_tables(report: dict[str, Any]) -> None:
    print(f"\n{report['device']}  copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s")
    print("host us per call (fast relaunch / JIT only) and the kernel's own ms (graph replay):")
    for r in report.get("host_overhead", []):
        cells = "  ".join(f"{n} {r[f'{n}_host_us']:.1f}/{r[f'{n}_host_us_jit_only']:.1f}"
                          for n in ("wrapper", "planned", "backend_layer"))
        print(f"  batch {r['batch']:>3} ctx {r['context']:>5}: {cells}  "
              f"kernel {r['kernel_ms_graph']:.4f} ms")
    print(f"{'batch':>6} {'ctx':>6} {'splits':>6} {'ms':>8} {'GB/s':>8} {'%copy':>6} "
          f"{'sdpa GB/s':>10} {'planned ms':>10}")
    for r in report["decode"]:
        if "ms" not in r:
            print(f"{r['batch']:>6} {r['context']:>6}  {r.get('skipped', r.get('error', ''))}")
            continue
        print(f"{r['batch']:>6} {r['context']:>6} {r['num_splits']:>6} {r['ms']:>8.3f} "
              f"{r['gbs']:>8.0f} {r['pct_of_copy']:>6.1f} {r.get('sdpa_gbs', float('nan')):>10.0f}"
              f" {r.get('planned_ms', float('nan')):>10.3f}")
    print(f"\n{'batch':>6} {'q_len':>6} {'prefix':>6} {'ms':>8} {'TFLOP/s':>8} {'sdpa TFLOP/s':>12}")
    for r in report["prefill"]:
        if "ms" not in r:
            print(f"{r['batch']:>6} {r['q_len']:>6} {r['prefix']:>6}  {r.get('skipped', '')}")
            continue
        print(f"{r['batch']:>6} {r['q_len']:>6} {r['prefix']:>6} {r['ms']:>8.3f} "
              f"{r['tflops']:>8.1f} {r.get('sdpa_tflops', float('nan')):>12.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the report here as JSON (rewritten after each case)")
    parser.add_argument("--tune", action="store_true", help="also sweep launch configurations")
    parser.add_argument("--quick", action="store_true", help="batch {1,64} x context {4096}")
    parser.add_argument("--moe", action="store_true",
                        help="also the fused-MoE kernel vs a per-expert loop (kernels_moe.py)")
    parser.add_argument("--moe-only", action="store_true", help="only the fused-MoE benchmark")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU here; the kernel benchmarks need one. Skipping.")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"skipped": "no CUDA GPU"}, f)
        return 0
    import triton

    device = torch.device("cuda")
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": PAGE,
                  "dtype": str(DTYPE).removeprefix("torch.")},
        "decode": [], "prefill": [],
    }

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)

    if args.moe or args.moe_only:
        from kernels_moe import print_moe_table, run_moe

        report["moe"] = {}
        run_moe(device, bench_ms, report["moe"], save, (1, 64, 512) if args.quick else None)
        release()
        if args.moe_only:
            print_moe_table(report["moe"])
            return 0
    report["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device)
    release()
    save()
    report["host_overhead"] = host_overhead(device)
    save()
    batches, contexts = ((1, 64), (4096,)) if args.quick else (BATCHES, CONTEXTS)
    for batch in batches:
        for ctx in contexts:
            report["decode"].append(decode_case(batch, ctx, report["copy_bandwidth_gbs"], device))
            release()
            print(json.dumps(report["decode"][-1]), flush=True)
            save()
    for batch, q_len, prefix in PREFILL[:2] if args.quick else PREFILL:
        report["prefill"].append(prefill_case(batch, q_len, prefix, device))
        release()
        print(json.dumps(report["prefill"][-1]), flush=True)
        save()
    if args.tune:
        report["tune"] = {}
        tune(device, report["tune"], save)
        release()
    print_tables(report)
    if "moe" in report:
        print_moe_table(report["moe"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
