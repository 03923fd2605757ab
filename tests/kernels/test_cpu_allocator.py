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

# Allocates, fills and frees a 64 MiB tensor three times (as steps do) and reports the page faults
# of the last: glibc may place the second one elsewhere, and from then on it reuses the block.
PROBE = """
import json, resource, torch
from llmserve.kernels.cpu_allocator import keep_freed_memory
on = keep_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20).fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
faults()
print(json.dumps({"on": on, "faults": faults()}))
"""


def _probe(**env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_freed_64_mib_tensor_is_reused_without_page_faults():
    kept = _probe()
    assert kept["on"] is True
    assert kept["faults"] < 500  # 64 MiB is 16,384 pages of 4 KiB
    default = _probe(**{cpu_allocator.ENV_SWITCH: "0"})
    assert default["on"] is False
    assert default["faults"] > 4000  # glibc's default: mmap'd again, faulted in again
