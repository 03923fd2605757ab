"""Summarise interleaved serving rounds from compare_serving.sh: medians per server and the ratio.

    python benchmarks/summarize_serving.py ROUND_DIR --out benchmarks/results/DATE-cpu-serving.json

ROUND_DIR holds `round-<k>-<server>.json` files written by benchmarks/serving.py. The ratio is
llmserve's output tok/s over the better of the peer's configurations, per round and of medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import sys

SUBJECT = "llmserve"


def load_rounds(directory: pathlib.Path) -> dict[int, dict[str, dict]]:
    rounds: dict[int, dict[str, dict]] = {}
    for path in sorted(directory.glob("round-*.json")):
        match = re.fullmatch(r"round-(\d+)-(.+)\.json", path.name)
        if match:
            rounds.setdefault(int(match[1]), {})[match[2]] = json.loads(path.read_text())
    return rounds


def summarize(rounds: dict[int, dict[str, dict]]) -> dict:
    servers = sorted({name for r in rounds.values() for name in r})
    peers = [s for s in servers if s != SUBJECT]
    per_round = []
    for k, results in sorted(rounds.items()):
        best_peer = max((results[p]["output_throughput"] for p in peers if p in results), default=None)
        ours = results.get(SUBJECT, {}).get("output_throughput")
        per_round.append({
            "round": k,
            **{name: {"output_tok_s": r["output_throughput"], "ttft_p90_ms": r["ttft_ms"]["p90"],
                      "failed": r["failed"]} for name, r in results.items()},
            "ratio_vs_best_peer": ours / best_peer if ours and best_peer else None,
        })
    medians = {
        name: {
            "output_tok_s": statistics.median(r[name]["output_throughput"] for r in rounds.values() if name in r),
            "ttft_p90_ms": statistics.median(r[name]["ttft_ms"]["p90"] for r in rounds.values() if name in r),
        }
        for name in servers
    }
    best_peer = max(peers, key=lambda p: medians[p]["output_tok_s"]) if peers else None
    ratio = (medians[SUBJECT]["output_tok_s"] / medians[best_peer]["output_tok_s"]
             if best_peer and SUBJECT in medians else None)
    return {"per_round": per_round, "median": medians, "best_peer": best_peer,
            "ratio_of_medians": ratio}


def hardware() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for module in ("torch", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "gpu": None,
            "python": platform.python_version(), **versions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("round_dir", type=pathlib.Path)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    rounds = load_rounds(args.round_dir)
    if not rounds:
        print(f"no round-*.json files in {args.round_dir}", file=sys.stderr)
        return 1
    summary = summarize(rounds)
    any_result = next(iter(next(iter(rounds.values())).values()))
    workload = {k: any_result[k] for k in ("endpoint", "num_prompts", "max_concurrency",
                                           "input_len", "output_len", "seed")}
    print(f"{'server':<28}{'median tok/s':>14}{'median TTFT p90 ms':>20}   per round tok/s")
    for name, m in summary["median"].items():
        rounds_text = ", ".join(f"{r[name]['output_tok_s']:.0f}" for r in summary["per_round"] if name in r)
        print(f"{name:<28}{m['output_tok_s']:>14.0f}{m['ttft_p90_ms']:>20.0f}   {rounds_text}")
    ratios = [r["ratio_vs_best_peer"] for r in summary["per_round"] if r["ratio_vs_best_peer"]]
    if summary["ratio_of_medians"]:
        print(f"llmserve / best peer ({summary['best_peer']}): {summary['ratio_of_medians']:.2f}x of "
              f"medians; per round {', '.join(f'{x:.2f}x' for x in ratios)}")
    if args.out:
        report = {"date": datetime.date.today().isoformat(), "hardware": hardware(),
                  "workload": workload, **summary,
                  "rounds": {str(k): v for k, v in sorted(rounds.items())}}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
