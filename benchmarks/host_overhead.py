"""Host overhead per engine step: the real engine around a model whose forward costs nothing.

The scheduler, KV-cache manager, runner bookkeeping, sampler and output processing of
`LLMEngine` run for real; the model's `forward` and `compute_logits` are replaced by stand-ins
that return preallocated tensors of the right shape. N running decode sequences (a mix of
greedy / top-p, stop strings, logprobs) are warmed up until all decode, then `--steps` steps
are timed and split by phase. Prints a human table and JSON (one object per batch size).

    python benchmarks/host_overhead.py                         # 1, 64, 256, 512 sequences
    python benchmarks/host_overhead.py --batch-sizes 256 --steps 100 --json out.json

Phases are measured by wrapping engine methods at run time (see `PHASES`); each phase's time
is exclusive of the wrapped phases it calls, so the phases add up to the step. An engine that
reports its own phase times (`ENGINE_REPORT_METHOD`) is summarised alongside.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Phase:
    """A phase of a step: the engine methods whose time it owns, whether it can overlap the
    device running the next step (it is then off the critical path when the engine schedules
    asynchronously), and whether it is tensor work that runs on the GPU there (so on CPU it is
    arithmetic, not host overhead)."""

    name: str
    # (where, method name); where is an attribute path from the engine ("runner.sampler", ""
    # for the engine itself) or "module:Class" for objects made anew each step.
    targets: tuple[tuple[str, str], ...]
    overlappable: bool = False
    device_work: bool = False

    def critical(self, overlap: bool) -> bool:
        return not (overlap and self.overlappable)


# The one table to adapt when the engine changes. "prepare" is all runner time outside forward
# and sampling (persistent-batch deltas, step arrays, tensors, gathering the sampled rows).
# With async scheduling the engine launches step N+1 before it reads step N's tokens, applies
# its stops and builds its outputs: those phases overlap the device. "other" wraps the step
# itself: it gets what no phase claims.
PHASES: tuple[Phase, ...] = (
    Phase("schedule", (("scheduler", "schedule"),)),
    Phase("prepare", (("runner", "launch"),)),
    Phase("forward+logits", (("runner.model", "forward"), ("runner.model", "compute_logits")),
          device_work=True),
    Phase("sample", (("runner.sampler", "sample"),), device_work=True),
    Phase("read tokens", (("llmserve.engine.model_runner:InFlightStep", "result"),),
          overlappable=True),
    Phase("update", (("scheduler", "update_from_output"),), overlappable=True),
    Phase("output", (("outputs", "process"), ("outputs", "record_logprobs"), ("", "_complete")),
          overlappable=True),
    Phase("other", (("", "step"),)),
)

# If the engine has this method, it is called after every measured step and must return
# {phase name: (seconds spent in that step, on the critical path?)}.
ENGINE_REPORT_METHOD = "host_phase_report"

STOP_STRINGS = ["\nUser:", "<|im_end|>"]  # multi-token: random tokens never spell them
CHECKPOINT = dict(  # tiny weights (never run), the real tokenizer of the default model
    architecture="llama", tokenizer="cl100k", hidden_size=64, intermediate_size=128,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    max_position_embeddings=4096, tie_word_embeddings=True,
)
PROMPT_TEXT = (
    "A serving engine reads a prompt, turns it into tokens, and writes new tokens one at a time "
    "until it meets a stop condition or a length limit. Users ask questions about the weather, "
    "their code, a recipe or a date in 2024, and the assistant answers them in plain words. "
)


class PhaseTimer:
    """Accumulates exclusive time per phase, as wall time and as this thread's CPU time (which
    other processes on a busy machine barely disturb). A wrapped call nested in another is
    subtracted from its caller, so the phases of a step add up to the step."""

    def __init__(self, names: list[str]) -> None:
        self.step = dict.fromkeys(names, 0.0)  # wall seconds in the current step
        self.step_cpu = dict.fromkeys(names, 0.0)
        self.calls = dict.fromkeys(names, 0)  # over the whole run: 0 means the table is stale
        self._stack: list[list[float]] = []  # [wall, cpu] spent in wrapped children, per open call

    def reset(self) -> None:
        for name in self.step:
            self.step[name] = self.step_cpu[name] = 0.0

    def wrap(self, name: str, fn: Callable) -> Callable:
        wall, cpu, calls, stack = self.step, self.step_cpu, self.calls, self._stack
        clock, cpu_clock = time.perf_counter, time.thread_time

        def timed(*args, **kwargs):
            calls[name] += 1
            children = [0.0, 0.0]
            stack.append(children)
            start, start_cpu = clock(), cpu_clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed, elapsed_cpu = clock() - start, cpu_clock() - start_cpu
                stack.pop()
                wall[name] += elapsed - children[0]
                cpu[name] += elapsed_cpu - children[1]
                if stack:
                    stack[-1][0] += elapsed
                    stack[-1][1] += elapsed_cpu

        return timed


def _resolve(engine: Any, path: str, phase: str) -> Any:
    """The object at `path`: attributes from the engine ("runner.sampler"), or a class named
    "module:Class" for methods of objects made anew each step."""
    if ":" in path:
        module, _, name = path.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise ValueError(f"phase {phase!r}: no class {path!r}; adapt PHASES in "
                             "benchmarks/host_overhead.py to the engine") from None
    obj = engine
    for part in filter(None, path.split(".")):
        if not hasattr(obj, part):
            raise ValueError(
                f"phase {phase!r}: the engine has no {path!r} ({type(obj).__name__} lacks "
                f"{part!r}); adapt PHASES in benchmarks/host_overhead.py to the engine"
            )
        obj = getattr(obj, part)
    return obj


def install_timers(engine: Any, phases: tuple[Phase, ...], timer: PhaseTimer
                   ) -> list[Callable[[], None]]:
    """Replace every target method by a timed wrapper; a missing one is a ValueError.

    Returns the undo actions (class-level wrappers would otherwise outlive the run)."""
    undo: list[Callable[[], None]] = []
    for phase in phases:
        for path, method in phase.targets:
            obj = _resolve(engine, path, phase.name)
            if not callable(getattr(obj, method, None)):
                raise ValueError(
                    f"phase {phase.name!r}: {path or 'the engine'} ({type(obj).__name__}) has no "
                    f"method {method!r}; adapt PHASES in benchmarks/host_overhead.py"
                )
            if isinstance(obj, type):  # every instance, also those made during the run
                raw = obj.__dict__.get(method)
                fn = timer.wrap(phase.name, getattr(obj, method))
                bound = isinstance(raw, (staticmethod, classmethod))  # fn is already bound
                setattr(obj, method, staticmethod(fn) if bound else fn)
                undo.append(lambda o=obj, m=method, r=raw: (
                    setattr(o, m, r) if r is not None else delattr(o, m)))
            elif method.startswith("__"):
                # Call syntax looks dunders up on the type: give this one object its own subclass.
                cls = type(obj)
                wrapped = timer.wrap(phase.name, getattr(cls, method))
                obj.__class__ = type(cls.__name__, (cls,), {method: wrapped})
                undo.append(lambda o=obj, c=cls: setattr(o, "__class__", c))
            else:
                setattr(obj, method, timer.wrap(phase.name, getattr(obj, method)))
    return undo


def install_stand_in(engine: Any, vocab: int, seed: int) -> None:
    """Make the model free: forward returns a preallocated hidden state, compute_logits a window
    of fixed random logits that shifts each call (so greedy rows do not repeat one token)."""
    runner = engine.runner
    model = runner.model
    cfg = runner.config
    rows = cfg.scheduler.max_num_batched_tokens
    hidden = torch.zeros(rows, int(model.config["hidden_size"]), dtype=runner.dtype,
                         device=runner.device)
    shifts = 16
    gen = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(cfg.scheduler.max_num_seqs + shifts, vocab, generator=gen)
              ).to(runner.device)
    calls = [0]

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return hidden[: input_ids.shape[0]]

    def compute_logits(h: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        offset = calls[0] % shifts
        return logits[offset : offset + h.shape[0]]

    model.forward = forward
    model.compute_logits = compute_logits


def make_requests(tokenizer: Any, batch: int, lo: int, hi: int, seed: int) -> list[tuple[list[int], dict]]:
    """(prompt ids, SamplingParams kwargs) per sequence: top-p on odd rows, stop strings on
    every fifth, logprobs on every tenth (row 0, the batch-1 case, is plain greedy)."""
    rng = random.Random(seed)
    text_ids = tokenizer.encode(PROMPT_TEXT * (hi // 40 + 2), add_special_tokens=False)
    out = []
    for i in range(batch):
        n = rng.randint(lo, hi)
        start = rng.randrange(len(text_ids) - n)
        params: dict = dict(temperature=0.0, ignore_eos=True)
        if i % 2 == 1:
            params.update(temperature=0.8, top_p=0.9)
        if i % 5 == 2:
            params["stop"] = STOP_STRINGS
        if i % 10 == 9:
            params["logprobs"] = 5
        out.append(([rng.randrange(1000, 30000)] + text_ids[start : start + n - 1], params))
    return out


def build_engine(args, model_dir: str, batch: int, requests: list) -> tuple[Any, int]:
    """An engine with KV blocks for every sequence at its longest; returns it and max_tokens."""
    from llmserve.engine.llm_engine import LLMEngine

    budget = args.max_num_batched_tokens
    prompt_tokens = sum(len(p) for p, _ in requests)
    # Requests prefilled early decode while the rest prefill: room for that, warm-up and steps.
    max_tokens = args.steps + args.warmup + -(-prompt_tokens // budget) + 16
    blocks = sum(-(-(len(p) + max_tokens) // args.block_size) for p, _ in requests) + batch
    engine = LLMEngine.from_args(
        model_dir, device=args.device, enforce_eager=True, block_size=args.block_size,
        num_kv_blocks=blocks, max_num_seqs=max(512, max(args.batch_sizes)),
        max_num_batched_tokens=budget, **args.engine_arg,
    )
    return engine, max_tokens


def _check_step(outputs: list, where: str) -> None:
    finished = [o.request_id for o in outputs if o.finished]
    if finished:
        raise RuntimeError(f"{where}: {len(finished)} request(s) finished (e.g. {finished[0]}); "
                           "every sequence must keep decoding through the measured window")


def run_batch(args, model_dir: str, batch: int) -> dict:
    """Warm `batch` sequences into steady decode, then time `args.steps` steps by phase."""
    from llmserve.sampling_params import SamplingParams
    from llmserve.tokenizer import Tokenizer

    requests = make_requests(Tokenizer.from_pretrained(model_dir), batch, *args.prompt_len_range,
                             seed=args.seed)
    engine, max_tokens = build_engine(args, model_dir, batch, requests)
    install_stand_in(engine, args.vocab, args.seed)
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, **params))
    tokens = dict.fromkeys((f"r{i}" for i in range(batch)), 0)
    for _ in range(100_000):  # prefill until everyone has sampled
        if min(tokens.values()) > 0:
            break
        outputs = engine.step()
        _check_step(outputs, "prefill")
        for out in outputs:
            tokens[out.request_id] = len(out.outputs[0].token_ids)
    else:
        raise RuntimeError("prefill did not bring every sequence to decode")
    for _ in range(args.warmup):
        _check_step(engine.step(), "warm-up")

    timer = PhaseTimer([p.name for p in PHASES])
    undo = install_timers(engine, PHASES, timer)
    try:
        result = _measure(args, engine, batch, timer)
    finally:
        for action in undo:
            action()
        engine.shutdown()
    return result


def _measure(args, engine: Any, batch: int, timer: PhaseTimer) -> dict:
    report = getattr(engine, ENGINE_REPORT_METHOD, None)
    per_phase: dict[str, list[float]] = {p.name: [] for p in PHASES}
    per_phase_cpu: dict[str, list[float]] = {p.name: [] for p in PHASES}
    totals: list[float] = []
    totals_cpu: list[float] = []
    reported: list[dict] = []
    for k in range(args.steps):
        timer.reset()
        start, start_cpu = time.perf_counter(), time.thread_time()
        outputs = engine.step()
        totals.append(time.perf_counter() - start)
        totals_cpu.append(time.thread_time() - start_cpu)
        _check_step(outputs, f"measured step {k}")
        if len(outputs) != batch:
            raise RuntimeError(f"measured step {k}: {len(outputs)} outputs for {batch} decoding "
                               "sequences; the measured window must have all of them decoding")
        for name in per_phase:
            per_phase[name].append(timer.step[name])
            per_phase_cpu[name].append(timer.step_cpu[name])
        if callable(report):
            reported.append(dict(report()))
    idle = [name for name, n in timer.calls.items() if n == 0]
    if idle:
        raise ValueError(f"phase(s) {idle}: no target method was called during the measured "
                         "steps; adapt PHASES in benchmarks/host_overhead.py to the engine")
    overlap = bool(getattr(engine, "async_scheduling", False))
    critical = {p.name: p.critical(overlap) for p in PHASES}
    device = {p.name for p in PHASES if p.device_work}
    result = {"batch_size": batch, "steps": args.steps, "async_scheduling": overlap,
              **summarize(per_phase, critical, totals, device),
              "cpu": summarize(per_phase_cpu, critical, totals_cpu, device)}
    if reported:
        names = list(reported[0])
        result["engine_report"] = summarize(
            {n: [float(r[n][0]) for r in reported] for n in names},
            {n: bool(reported[0][n][1]) for n in names}, None,
        )
    return result


def _stats(seconds: list[float]) -> dict[str, float]:
    return {"mean_us": statistics.fmean(seconds) * 1e6, "median_us": statistics.median(seconds) * 1e6}


def summarize(per_phase: dict[str, list[float]], critical: dict[str, bool],
              totals: list[float] | None, device: set[str] = frozenset()) -> dict:
    """Per-phase mean/median µs per step, the critical-path total (and its host part: without
    the phases that are device work on a GPU) and the step total."""
    steps = len(next(iter(per_phase.values())))
    crit = [sum(v[i] for n, v in per_phase.items() if critical[n]) for i in range(steps)]
    host = [sum(v[i] for n, v in per_phase.items() if critical[n] and n not in device)
            for i in range(steps)]
    if totals is None:
        totals = [sum(v[i] for v in per_phase.values()) for i in range(steps)]
    return {
        "phases": {n: {**_stats(v), "critical": critical[n]} for n, v in per_phase.items()},
        "critical_path_us": _stats(crit),
        "critical_path_host_us": _stats(host),
        "step_total_us": _stats(totals),
    }


def checkpoint(args) -> str:
    if args.model:
        return args.model
    from llmserve.models.random_checkpoint import build_random_checkpoint

    path = Path(tempfile.gettempdir()) / "llmserve-bench-host-overhead-v1"
    if not (path / "config.json").exists():
        build_random_checkpoint(path, **CHECKPOINT)
    return str(path)


def hardware() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def source_commit() -> str | None:
    """HEAD of the checkout llmserve was imported from, read from .git (no git process)."""
    import llmserve

    git = Path(llmserve.__file__).resolve().parents[1] / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        common = Path((git / "commondir").read_text().strip()) if (git / "commondir").exists() else None
        roots = [git] + ([git / common if not common.is_absolute() else common] if common else [])
        for root in roots:
            if (root / ref).exists():
                return (root / ref).read_text().strip()
            packed = root / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def print_table(results: list[dict]) -> None:
    cols = "".join(f"{'batch ' + str(r['batch_size']):>22}" for r in results)

    def row(label: str, cells: list[dict]) -> None:
        print(f"{label:<18}" + "".join(
            f"{c['median_us']:>12.1f} ({c['mean_us']:>7.1f})" for c in cells))

    def table(title: str, parts: list[dict]) -> None:
        print(f"\n{title}, median (mean); * = critical path\n{'phase':<18}{cols}")
        for name, phase in parts[0]["phases"].items():
            row(("* " if phase["critical"] else "  ") + name, [p["phases"][name] for p in parts])
        row("critical path", [p["critical_path_us"] for p in parts])
        row("  host part", [p["critical_path_host_us"] for p in parts])
        row("step total", [p["step_total_us"] for p in parts])

    table("host wall µs per step", results)
    table("host CPU µs per step (this thread)", [r["cpu"] for r in results])
    if "engine_report" in results[0]:
        table("the engine's own report, wall µs per step", [r["engine_report"] for r in results])


def _engine_arg(parser: argparse.ArgumentParser, text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        parser.error(f"--engine-arg takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a bare string


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256, 512])
    p.add_argument("--steps", type=int, default=50, help="measured decode steps per batch size")
    p.add_argument("--warmup", type=int, default=5, help="decode steps after prefill, not measured")
    p.add_argument("--vocab", type=int, default=32000, help="width of the stand-in logits")
    p.add_argument("--prompt-len-range", type=int, nargs=2, default=[100, 1024])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    # One thread by default: the host work is single-threaded Python, and on a busy machine
    # OpenMP threads waiting for a descheduled peer cost more than the small ops they split.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--model", default=None, help="checkpoint directory (else a tiny cl100k one is built)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra LLMEngine.from_args option, value as JSON (e.g. async_scheduling=true)")
    p.add_argument("--note", default=None, help="free text stored in the JSON")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    args.engine_arg = dict(_engine_arg(p, a) for a in args.engine_arg)
    lo, hi = args.prompt_len_range
    if not 2 <= lo <= hi or args.steps < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("need 2 <= prompt lengths, lo <= hi, --steps >= 1, --warmup >= 0, batch sizes >= 1")
    if not 1 <= args.vocab <= 100_000:
        p.error("--vocab must be in [1, 100000] (ids must be tokens of the cl100k tokenizer)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = checkpoint(args)
    import llmserve

    results = [run_batch(args, model_dir, b) for b in args.batch_sizes]
    report = {
        "benchmark": "host_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "hardware": hardware(),
        "commit": source_commit(),
        "llmserve_path": str(Path(llmserve.__file__).resolve().parent),
        "note": args.note,
        "config": {k: getattr(args, k) for k in
                   ("steps", "warmup", "vocab", "prompt_len_range", "block_size",
                    "max_num_batched_tokens", "device", "seed", "engine_arg")},
        "results": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    print_table(results)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
