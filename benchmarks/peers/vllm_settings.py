"""Environment for vLLM's CPU build as a benchmark peer: its documented CPU settings, in one place.

Used by benchmarks/throughput.py (offline) and benchmarks/peers/vllm_serve.sh (online), so both
measure vLLM with the same settings, and recorded in their JSON. Standard library only: it runs
in the dev virtualenv, not in vLLM's.

    python benchmarks/peers/vllm_settings.py --shell   # `export` lines for bash
    python benchmarks/peers/vllm_settings.py           # the settings as JSON

Settings (each can be overridden by setting the variable before the run):
- VLLM_CPU_OMP_THREADS_BIND: every core this process may run on ("0-1" on the 2-core machines).
  vLLM's default "auto" reserves one core for its scheduler process on x86, which on 2 cores
  leaves one OpenMP thread; binding both made vLLM ~1.3x faster in the issue's measurement.
- VLLM_CPU_KVCACHE_SPACE: KV cache in GiB (2: the benchmark workloads need < 0.2 GiB, so
  no preemption; more only costs start-up time zeroing memory).
- LD_PRELOAD: TCMalloc and Intel OpenMP (libiomp5, installed with vllm-cpu), the libraries vLLM's
  CPU docs ("set LD_PRELOAD") and its CPU worker's start-up check ask for on x86. TCMalloc is the
  Debian/Ubuntu package libtcmalloc-minimal4. With libiomp5 vLLM binds through KMP_AFFINITY and
  sets KMP_BLOCKTIME=5, so its threads sleep 5 ms after work instead of spinning.
  VLLM_PEER_IOMP=0 leaves libiomp5 out (vLLM then preloads torch's libgomp), for an A/B.
- VLLM_NO_USAGE_STATS / DO_NOT_TRACK / HF_HUB_OFFLINE: these machines have no internet.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm"))
DEFAULT_KV_GIB = 2
TCMALLOC_GLOBS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*",
                  "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so*",
                  "/usr/lib64/libtcmalloc_minimal.so*")


def vllm_python() -> Path:
    """The interpreter of vLLM's own virtualenv (made by `make peer-vllm`)."""
    return VENV / "bin" / "python"


def available() -> bool:
    return vllm_python().exists()


def core_list() -> str:
    """The cores this process may run on, as vLLM's bind syntax ("0-1", "0,2,5")."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return ",".join(map(str, cores))


def tcmalloc() -> str | None:
    for pattern in TCMALLOC_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables to add to vLLM's environment (values already in `environ` win)."""
    environ = dict(os.environ if environ is None else environ)
    chosen = {
        "VLLM_CPU_OMP_THREADS_BIND": core_list(),
        "VLLM_CPU_KVCACHE_SPACE": str(DEFAULT_KV_GIB),
        "VLLM_TARGET_DEVICE": "cpu",  # the platform check cannot find a distribution named vllm
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    preload = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    tc = tcmalloc()
    if tc and not any("tcmalloc" in p for p in preload):
        preload.insert(0, tc)
    iomp = VENV / "lib" / "libiomp5.so"
    # VLLM_PEER_IOMP=0 leaves OpenMP to torch's libgomp (which vLLM then preloads), for an A/B.
    use_iomp = environ.get("VLLM_PEER_IOMP", "1") != "0"
    if use_iomp and iomp.exists() and not any("omp" in p for p in preload):
        preload.append(str(iomp))
    if preload:
        chosen["LD_PRELOAD"] = ":".join(preload)
    return {k: environ.get(k, v) if k != "LD_PRELOAD" else v for k, v in chosen.items()}


def environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A full environment for a vLLM subprocess: `environ` plus `settings()`."""
    env = dict(os.environ if environ is None else environ)
    env.update(settings(env))
    # The dev virtualenv's variables must not leak into vLLM's interpreter.
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    return env


def record() -> dict:
    """What the JSON results keep about vLLM's settings."""
    s = settings()
    return {"env": {k: v for k, v in s.items() if k.startswith(("VLLM_CPU", "LD_PRELOAD"))},
            "tcmalloc": "tcmalloc" in s.get("LD_PRELOAD", ""),
            "iomp": "libiomp" in s.get("LD_PRELOAD", ""), "venv": str(VENV)}


def main(argv: list[str]) -> int:
    if "--shell" in argv:
        for key, value in settings().items():
            print(f"export {key}={shlex.quote(value)}")
    else:
        print(json.dumps(record(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
