"""Batch runner throughput against `LLM.generate` on the same workload and the same engine.

    python -m llmserve.batch.bench --model DIR --num-requests 256 --max-tokens 64

Both paths run the same completion prompts (greedy, `ignore_eos`, so every request produces
exactly `--max-tokens` tokens) on one engine, alternating, after a warm-up; the best of
`--repeats` runs of each is compared, by wall time and by the process's CPU time (the CPU
figure is the steadier one on a machine shared with other work). Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from llmserve.commands.engine_args import add_engine_args, engine_kwargs


def workload(num_requests: int, max_tokens: int) -> list[dict]:
    """Batch lines of varied prompt lengths (so prefill and decode both matter)."""
    lines = []
    for i in range(num_requests):
        prompt = "the batch runner feeds the scheduler " * (1 + i % 7) + f"request {i}"
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                      "body": body})
    return lines


class _Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _time_generate(llm, lines: list[dict]) -> tuple[_Clock, int]:
    from llmserve import SamplingParams

    prompts = [line["body"]["prompt"] for line in lines]
    body = lines[0]["body"]
    params = SamplingParams(max_tokens=body["max_tokens"], temperature=0.0, ignore_eos=True)
    with _Clock() as clock:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return clock, sum(len(c.token_ids) for o in outs for c in o.outputs)


def _time_batch(llm, lines: list[dict], workdir: Path, run: int) -> tuple[_Clock, int]:
    from llmserve.batch.lines import parse_lines
    from llmserve.batch.progress import ResultLog
    from llmserve.batch.runner import BatchRunner

    src = workdir / "input.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    with _Clock() as clock:  # parsing, validation, tokenization and writing all count
        parsed = parse_lines(src.read_text(encoding="utf-8").split("\n"))
        with ResultLog(workdir / f"output-{run}.jsonl") as log:
            summary = BatchRunner(llm.engine, use_tqdm=False).run(parsed, log)
    return clock, summary.completion_tokens


def compare(llm, num_requests: int, max_tokens: int, repeats: int) -> dict:
    """Best-of-`repeats` tokens/s of both paths, measured alternately in one process."""
    lines = workload(num_requests, max_tokens)
    _time_generate(llm, lines[: min(8, len(lines))])  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"generate": [], "batch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(repeats):
            for name, (clock, n) in (("generate", _time_generate(llm, lines)),
                                     ("batch", _time_batch(llm, lines, Path(tmp), run))):
                runs[name].append((n / clock.wall, n / clock.cpu))
    best = {name: (max(r[0] for r in rs), max(r[1] for r in rs)) for name, rs in runs.items()}
    return {"num_requests": num_requests, "max_tokens": max_tokens, "repeats": repeats,
            "generate_tok_s": round(best["generate"][0], 1),
            "batch_tok_s": round(best["batch"][0], 1),
            "ratio": round(best["batch"][0] / best["generate"][0], 3),
            "generate_tok_per_cpu_s": round(best["generate"][1], 1),
            "batch_tok_per_cpu_s": round(best["batch"][1], 1),
            "cpu_ratio": round(best["batch"][1] / best["generate"][1], 3),
            "wall_runs": {k: [round(r[0], 1) for r in v] for k, v in runs.items()}}


def main(argv: list[str] | None = None) -> int:
    from llmserve import LLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    add_engine_args(p)
    args = p.parse_args(argv)
    llm = LLM(**engine_kwargs(args))
    result = compare(llm, args.num_requests, args.max_tokens, args.repeats)
    print(json.dumps(result))
    print(f"{'path':<16}{'tok/s (wall)':>14}{'tok/CPU-s':>12}")
    for name, key in (("LLM.generate", "generate"), ("llmserve batch", "batch")):
        print(f"{name:<16}{result[key + '_tok_s']:>14}{result[key + '_tok_per_cpu_s']:>12}")
    print(f"{'ratio':<16}{result['ratio']:>14}{result['cpu_ratio']:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
