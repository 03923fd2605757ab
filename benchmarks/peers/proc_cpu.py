"""CPU seconds (user + system) used so far by a process and every process under it, from /proc.

The benchmarks keep a peer (vLLM) running between its turns because it takes a minute or more
to start; they read this before and after the other engines' turns to show that the idle peer
did not take CPU from them.

    python benchmarks/peers/proc_cpu.py PID     # prints the seconds
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in children.read_text().split())
            except OSError:
                pass
    return pids


def tree_cpu_seconds(pid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


if __name__ == "__main__":
    print(f"{tree_cpu_seconds(int(sys.argv[1])):.2f}")
