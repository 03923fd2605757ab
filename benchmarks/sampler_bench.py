"""Sampler: milliseconds per call, the baseline's sampler against the working tree's, interleaved.

Cases: greedy, top-p 0.9, top-k 50 + top-p 0.9, and penalties (repetition 1.1, presence 0.5,
frequency 0.3, temperature 0.8; 256 prompt + 128 output tokens, one token appended per call as
in decode). Logits are `flat` (randn: random-weights models, the nucleus is most of the
vocabulary) or `peaked` (4 * randn: a nucleus of tens to thousands of tokens). The baseline is
the sampler at a git revision (default 8c190b1, the last full-sort sampler), loaded from a
temporary file. Each round times both, alternating which goes first; the figures are medians
over rounds of wall and process-CPU ms per call. Prints JSON, then a table.

    PYTHONPATH=. python benchmarks/sampler_bench.py [--batches 1 8 64 256] [--vocab 32000]
        [--logits flat|peaked] [--rounds 5] [--threads 1] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from llmserve.engine.request import Request
from llmserve.engine.sampler import Sampler
from llmserve.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
CASES: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "top_p_0.9": dict(temperature=1.0, top_p=0.9),
    "top_k_50+top_p_0.9": dict(temperature=1.0, top_k=50, top_p=0.9),
    "penalties": dict(temperature=0.8, repetition_penalty=1.1, presence_penalty=0.5,
                      frequency_penalty=0.3),
}  # fmt: skip


def load_baseline(rev: str) -> ModuleType:
    """The sampler module at `rev`, imported from a temporary file."""
    source = subprocess.run(
        ["git", "show", f"{rev}:llmserve/engine/sampler.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp(prefix="sampler-baseline-")) / "baseline_sampler.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_sampler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def make_requests(case: str, batch: int, vocab: int, gen: torch.Generator) -> list[Request]:
    reqs = []
    for i in range(batch):
        sp = SamplingParams(max_tokens=1 << 20, **CASES[case])
        prompt = torch.randint(vocab, (256,), generator=gen).tolist()
        req = Request(f"{case}-{i}", prompt, sp, max_tokens=sp.max_tokens)
        for t in torch.randint(vocab, (128,), generator=gen).tolist():
            req.append_token(t)
        reqs.append(req)
    return reqs


def make_logits(kind: str, batch: int, vocab: int, device: str) -> torch.Tensor:
    x = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(batch))
    return (x * 4 if kind == "peaked" else x).to(device)


def time_calls(fn: Callable[[], None], calls: int, device: str) -> tuple[float, float]:
    """Wall and process-CPU milliseconds per call over `calls` back-to-back calls.

    On a shared machine the CPU time is the steadier figure: it leaves out the time this
    process waited for a core (and it sums the CPU time of all torch threads).
    """
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall * 1e3 / calls, cpu * 1e3 / calls


def bench_config(
    samplers: dict[str, Callable], case: str, batch: int, vocab: int, args: argparse.Namespace
) -> dict:
    logits = make_logits(args.logits, batch, vocab, args.device)
    reqs = {name: make_requests(case, batch, vocab, torch.Generator().manual_seed(1))
            for name in samplers}  # fmt: skip

    def call(name: str) -> Callable[[], None]:
        def run() -> None:
            out = samplers[name](logits, reqs[name])
            for r, t in zip(reqs[name], out.token_ids, strict=True):
                r.append_token(t)  # decode: the history grows by one token per call

        return run

    calls = max(1, 32 // batch)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in samplers}
    for name in samplers:
        call(name)()  # warm-up
    names = list(samplers)
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            times[name].append(time_calls(call(name), calls, args.device))
    row: dict = {"case": case, "batch": batch, "vocab": vocab}
    for name in names:
        wall = [w for w, _ in times[name]]
        row[f"{name}_ms"] = round(statistics.median(wall), 3)
        row[f"{name}_cpu_ms"] = round(statistics.median(c for _, c in times[name]), 3)
        row[f"{name}_spread_ms"] = round(max(wall) - min(wall), 3)
    row["speedup"] = round(row["old_ms"] / row["new_ms"], 2)
    row["cpu_speedup"] = round(row["old_cpu_ms"] / row["new_cpu_ms"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--logits", choices=["flat", "peaked"], default="flat")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", default="8c190b1", help="git revision of the old sampler")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = {"old": load_baseline(args.baseline).Sampler(), "new": Sampler()}
    rows = []
    for vocab in args.vocab:
        for batch in args.batches:
            for case in args.cases:
                rows.append(bench_config(samplers, case, batch, vocab, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "benchmark": "sampler", "device": args.device, "logits": args.logits,
        "threads": torch.get_num_threads(), "rounds": args.rounds, "baseline": args.baseline,
        "torch": torch.__version__, "results": rows,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"\n{'case':<20} {'batch':>5} {'vocab':>7} {'old ms':>9} {'new ms':>9} {'speedup':>8}"
          f" {'old cpu':>9} {'new cpu':>9} {'speedup':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['case']:<20} {r['batch']:>5} {r['vocab']:>7} {r['old_ms']:>9.3f} "
              f"{r['new_ms']:>9.3f} {r['speedup']:>7.2f}x {r['old_cpu_ms']:>9.3f} "
              f"{r['new_cpu_ms']:>9.3f} {r['cpu_speedup']:>7.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
