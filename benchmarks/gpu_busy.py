"""How busy the GPU is during llmserve's end-to-end decode: device time over wall time.

Runs the offline engine step by step on a decode-heavy workload (default: 256 prompts of
100-1024 tokens, 100-1024 new tokens each, as in benchmarks/throughput.py). After
`--window-start` steps (prefill is over by then), it times `--window-steps` steps plainly, then
the next `--window-steps` under torch.profiler (CUDA activity only). The busy fraction is the
union of the device intervals of kernels, copies and memsets in the profiled window over the
window's wall time. The profiler adds a little host time per launch, so the plain window's
step time is reported too, with the fraction it implies (same device work per step assumed).
Prints a table and JSON; needs a CUDA GPU.

    python benchmarks/gpu_busy.py --model CKPT --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len-range", type=int, nargs=2, default=[100, 1024])
    p.add_argument("--output-len-range", type=int, nargs=2, default=[100, 1024])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--window-start", type=int, default=60, help="steps run before the windows")
    p.add_argument("--window-steps", type=int, default=100, help="steps in each window")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", default=None, help="keep the profiled window's Chrome trace here")
    p.add_argument("--json", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (overlapping streams count once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def device_activity(trace_path: str) -> dict:
    """Busy time, span and the costliest kernels from a Chrome trace of the window."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    intervals, by_name, counts = [], collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in DEVICE_CATEGORIES:
            continue
        start, dur = float(e["ts"]), float(e.get("dur", 0.0))
        intervals.append((start, start + dur))
        counts[e["cat"]] += 1
        if e["cat"] == "kernel":
            by_name[e.get("name", "?")[:120]] += dur
    span = (max(s for _, s in intervals) - min(s for s, _ in intervals)) if intervals else 0.0
    return {"busy_us": union_us(intervals), "span_us": span, "counts": dict(counts),
            "top_kernels_us": dict(by_name.most_common(12))}


def decode_tokens(engine) -> int:
    """Decode tokens computed in the engine's last step (0 if the engine does not say)."""
    last = getattr(engine, "last_step", None)
    work = getattr(last, "work", None) or {}
    return sum(d for _, d in work.values())


def run_window(engine, steps: int, device: torch.device) -> dict:
    torch.cuda.synchronize(device)
    tokens = done = 0
    start = time.perf_counter()
    while done < steps and engine.has_unfinished_requests():
        engine.step()
        tokens += decode_tokens(engine)
        done += 1
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    if done == 0:
        raise RuntimeError("every request finished before the window: lower --window-start")
    return {"wall_s": wall, "steps": done, "decode_tokens": tokens,
            "step_ms": wall / done * 1e3, "running_after": engine.stats().get("num_running")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict = {"benchmark": "gpu_busy", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "model": args.model, "dtype": args.dtype, "workload": {
                        "num_prompts": args.num_prompts, "input_len_range": args.input_len_range,
                        "output_len_range": args.output_len_range,
                        "window_start": args.window_start, "window_steps": args.window_steps,
                        "cuda_graphs": not args.enforce_eager}}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA GPU"
        save()
        print("benchmarks/gpu_busy.py: no CUDA GPU here; skipping.")
        return 0
    from llmserve import LLM, SamplingParams

    device = torch.device("cuda")
    result["gpu"] = torch.cuda.get_device_name(device)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
              enforce_eager=args.enforce_eager)
    engine = llm.engine
    for i in range(args.num_prompts):
        prompt = [rng.randrange(10, min(vocab, 32000) - 10)
                  for _ in range(rng.randint(*args.input_len_range))]
        params = SamplingParams(max_tokens=rng.randint(*args.output_len_range), temperature=0.0,
                                ignore_eos=True)
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    for _ in range(args.window_start):
        engine.step()
    result["plain"] = run_window(engine, args.window_steps, device)
    save()

    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CUDA])
    prof.start()
    profiled = run_window(engine, args.window_steps, device)
    prof.stop()
    trace = args.trace or os.path.join(tempfile.mkdtemp(), "gpu_busy_trace.json")
    prof.export_chrome_trace(trace)
    activity = device_activity(trace)
    if not args.trace:
        os.remove(trace)
    wall_us = profiled["wall_s"] * 1e6
    profiled.update(activity)
    profiled["busy_fraction"] = activity["busy_us"] / wall_us
    profiled["device_ms_per_step"] = activity["busy_us"] / 1e3 / profiled["steps"]
    result["profiled"] = profiled
    # The same device work per step against the unprofiled window's step time.
    result["busy_fraction_at_plain_step_time"] = min(
        1.0, profiled["device_ms_per_step"] / result["plain"]["step_ms"])
    result["busy_fraction"] = profiled["busy_fraction"]
    if activity["counts"].get("kernel", 0) < profiled["steps"]:
        result["warning"] = "fewer kernels than steps were recorded: the profiler missed them"
    save()
    print(f"\nplain window:    {result['plain']['step_ms']:.2f} ms/step "
          f"({result['plain']['decode_tokens']} decode tokens)")
    print(f"profiled window: {profiled['step_ms']:.2f} ms/step, device busy "
          f"{profiled['device_ms_per_step']:.2f} ms/step -> {100 * profiled['busy_fraction']:.1f}% "
          f"busy ({100 * result['busy_fraction_at_plain_step_time']:.1f}% at the plain step time)")
    for name, us in list(activity["top_kernels_us"].items())[:6]:
        print(f"  {us / 1e3 / profiled['steps']:8.3f} ms/step  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
