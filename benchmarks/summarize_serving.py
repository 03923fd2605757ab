"""Summarise interleaved serving rounds from compare_serving.sh: medians per server and the ratio.

    python benchmarks/summarize_serving.py ROUND_DIR --out benchmarks/results/DATE-cpu-serving.json

ROUND_DIR holds `round-<k>-<server>.json` files written by benchmarks/serving.py, and optionally
`peer-<server>.json` records about a peer (its settings, start-up time). The ratio is llmserve's
output tok/s over the best peer's, per round and of medians; `ratios` has it for every peer.
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
            **{name: {"output_tok_s": r["output_throughput"], "ttft_p50_ms": r["ttft_ms"]["p50"],
                      "ttft_p90_ms": r["ttft_ms"]["p90"], "failed": r["failed"]}
               for name, r in results.items()},
            "ratio_vs_best_peer": ours / best_peer if ours and best_peer else None,
        })
    medians = {
        name: {
            "output_tok_s": statistics.median(r[name]["output_throughput"] for r in rounds.values() if name in r),
            "ttft_p50_ms": statistics.median(r[name]["ttft_ms"]["p50"] for r in rounds.values() if name in r),
            "ttft_p90_ms": statistics.median(r[name]["ttft_ms"]["p90"] for r in rounds.values() if name in r),
        }
        for name in servers
    }
    best_peer = max(peers, key=lambda p: medians[p]["output_tok_s"]) if peers else None
    ratio = (medians[SUBJECT]["output_tok_s"] / medians[best_peer]["output_tok_s"]
             if best_peer and SUBJECT in medians else None)
    ratios = {}
    if SUBJECT in medians:
        for peer in peers:
            both = [r for r in rounds.values() if SUBJECT in r and peer in r]
            ratios[peer] = {
                "output_tok_s_of_medians": medians[SUBJECT]["output_tok_s"] / medians[peer]["output_tok_s"],
                "output_tok_s_per_round": [r[SUBJECT]["output_throughput"] / r[peer]["output_throughput"]
                                           for r in both],
                "ttft_p90_lower": medians[SUBJECT]["ttft_p90_ms"] < medians[peer]["ttft_p90_ms"],
            }
    return {"per_round": per_round, "median": medians, "best_peer": best_peer,
            "ratio_of_medians": ratio, "ratios": ratios}


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
    print(f"{'server':<28}{'median tok/s':>14}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}   per round tok/s")
    for name, m in summary["median"].items():
        rounds_text = ", ".join(f"{r[name]['output_tok_s']:.0f}" for r in summary["per_round"] if name in r)
        print(f"{name:<28}{m['output_tok_s']:>14.0f}{m['ttft_p50_ms']:>13.0f}{m['ttft_p90_ms']:>13.0f}   {rounds_text}")
    for peer, r in summary["ratios"].items():
        per_round = ", ".join(f"{x:.2f}x" for x in r["output_tok_s_per_round"])
        print(f"llmserve / {peer}: {r['output_tok_s_of_medians']:.2f}x of medians; per round {per_round}; "
              f"TTFT p90 {'lower' if r['ttft_p90_lower'] else 'NOT lower'}")
    ratios = [r["ratio_vs_best_peer"] for r in summary["per_round"] if r["ratio_vs_best_peer"]]
    if summary["ratio_of_medians"]:
        print(f"llmserve / best peer ({summary['best_peer']}): {summary['ratio_of_medians']:.2f}x of "
              f"medians; per round {', '.join(f'{x:.2f}x' for x in ratios)}")
    if args.out:
        peers = {p.name[len("peer-"):-len(".json")]: json.loads(p.read_text())
                 for p in sorted(args.round_dir.glob("peer-*.json"))}
        report = {"date": datetime.date.today().isoformat(), "hardware": hardware(),
                  "workload": workload, **summary, "peers": peers,
                  "rounds": {str(k): v for k, v in sorted(rounds.items())}}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
