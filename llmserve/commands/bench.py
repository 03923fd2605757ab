"""`llmserve bench throughput|serving|kernels|router ...`: run a benchmark from the source checkout.

The benchmarks live in the repository's `benchmarks/` folder (they are scripts that compare
llmserve with other engines, not part of the installed library); this command finds and runs them
with the remaining arguments.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCHMARKS = {
    "throughput": "throughput.py",
    "serving": "serving.py",
    "kernels": "kernels.py",
    "router": "router_overhead.py",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (throughput, serving, kernels, router)",
                       description=__doc__, add_help=True)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")
    p.set_defaults(func=run)


def benchmark_path(name: str) -> Path:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / BENCHMARKS[name]
    if not path.is_file():
        raise ValueError(f"{path} not found: the benchmarks ship with the source checkout")
    return path


def run(args: argparse.Namespace) -> int:
    path = benchmark_path(args.name)
    sys.argv = [str(path), *args.args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
