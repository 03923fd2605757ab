"""Freed host memory stays in the process on CPU: a step's big tensors are not page-faulted again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from llmserve.kernels import cpu_allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# Allocates, fills and frees a 64 MiB tensor again and again, as steps do. glibc places the first
# few elsewhere each time (torch asks for aligned blocks, which a freed block of the same size does
# not quite fit) and then reuses what it kept; reported: the page faults of the last 10 rounds,
# and how much the process grew over them.
PROBE = """
import json, resource, psutil, torch
from llmserve.kernels.cpu_allocator import keep_freed_memory
on = keep_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20).fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(20):
    faults()
rss = psutil.Process().memory_info().rss
late = [faults() for _ in range(10)]
grew = psutil.Process().memory_info().rss - rss
print(json.dumps({"on": on, "faults": late, "grew_mib": grew / 2**20}))
"""


def _probe(**env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_64_mib_tensors_are_reused_without_page_faults_and_without_growth():
    kept = _probe()
    assert kept["on"] is True
    assert sum(kept["faults"]) < 1000, kept  # each round is 16,384 pages of 4 KiB otherwise
    assert kept["grew_mib"] < 16, kept  # the heap settled: nothing leaks round after round
    default = _probe(**{cpu_allocator.ENV_SWITCH: "0"})
    assert default["on"] is False
    assert min(default["faults"]) > 4000, default  # glibc's default: mmap'd and faulted again
