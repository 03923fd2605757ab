"""Keep freed host memory in the process on CPU, so a step's big activations are not re-faulted.

glibc serves allocations above its mmap threshold (at most 32 MiB) with a fresh `mmap` and
returns them with `munmap` when freed. A CPU prefill step of a few thousand tokens allocates
several such tensors (the fused gate/up output of 8,192 tokens is 64 MiB, so are big-batch
logits), and every step then page-faults them in again: measured on 2 cores, a [8192, 256] x
[256, 2048] matmul took 42 ms with a fresh output and 25 ms into a reused one, and a
prefill-heavy run went from ~1.8 s to ~1.45 s with this setting. GPU engines keep a caching
allocator for the same reason; vLLM's CPU build asks for TCMalloc to be preloaded. Here glibc
is told, once, to serve big blocks from its heap (`M_MMAP_MAX` = 0) and to keep freed memory
(`M_TRIM_THRESHOLD` at its maximum), as a caching allocator would. The heap settles after a few
steps at a few times the biggest step's activations (torch asks for aligned blocks, which a freed
block of the same size does not quite fit, so the first repeats land elsewhere) and then stops
growing: on the prefill-heavy benchmark the process's peak RSS went from 2.78 to 2.97 GiB.

Only on Linux with glibc, and only for engines on CPU (`LLMSERVE_CPU_KEEP_MEMORY=0` turns it
off). Other allocators (a preloaded TCMalloc or jemalloc, musl) are left alone: `mallopt` is
glibc's and has no effect on them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

from llmserve.kernels import cpu_native

logger = logging.getLogger(__name__)

ENV_SWITCH = "LLMSERVE_CPU_KEEP_MEMORY"
# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process (once per process); returns whether the
    setting is in force."""
    if cpu_native.switched_off(ENV_SWITCH):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
    except (OSError, AttributeError) as exc:
        logger.info("glibc's mallopt is not available (%s): big CPU tensors stay mmap'd", exc)
        return False
    if done:
        logger.info("CPU engine: freed host memory is kept for reuse (%s=0 turns this off)",
                    ENV_SWITCH)
    return done
