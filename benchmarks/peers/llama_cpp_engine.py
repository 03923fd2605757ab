"""Client side of benchmarks/peers/llama_cpp_worker.py: llama.cpp as a peer of the CPU latency benchmark.

The checkpoint is converted to an f32 GGUF once (cached by the checkpoint's path and file times)
with llama.cpp's own converter, then the worker runs in the peer's virtualenv
(`make peer-llama-cpp`). Between its rounds the worker is stopped, as the vLLM peer is, so that
its OpenMP threads cannot take a core from the engine being measured.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peers.paused_worker import PausedWorker

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-llama"
WORKER = Path(__file__).with_name("llama_cpp_worker.py")
CONVERTER = Path(__file__).with_name("gguf_convert.py")


def venv_python() -> Path:
    return VENV / "bin" / "python"


def available() -> bool:
    return venv_python().exists() and (VENV / ".installed").exists()


def gguf_for(checkpoint: str) -> Path:
    """The checkpoint as an f32 GGUF, converted on first use."""
    src = Path(checkpoint)
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(src.iterdir()))
    key = hashlib.sha256(f"{src.resolve()}|{stamp}".encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / "llmserve-bench-gguf" / f"{src.name}-{key}-f32.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(".part")
        done = subprocess.run([sys.executable, str(CONVERTER), str(src), str(part)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"GGUF conversion failed:\n{done.stderr[-3000:]}")
        part.rename(out)
    return out


class LlamaCppPeer:
    """llama.cpp decoding greedily in a subprocess, stopped between its rounds (`paused_worker`)."""

    def __init__(self, checkpoint: str, threads: int, n_seq_max: int, n_ctx: int,
                 kv_type: str = "f32", flash_attn: str = "off") -> None:
        if not available():
            raise SystemExit(f"llama.cpp's virtualenv is missing ({venv_python()}); "
                             "run `make peer-llama-cpp` first")
        self.gguf = gguf_for(checkpoint)
        cmd = [str(venv_python()), str(WORKER), "--gguf", str(self.gguf), "--threads", str(threads),
               "--n-seq-max", str(n_seq_max), "--n-ctx", str(n_ctx), "--kv-type", kv_type,
               "--flash-attn", flash_attn]
        self.worker = PausedWorker("llama.cpp", "latency-llama-cpp")
        start = time.perf_counter()
        ready = self.worker.start(cmd, dict(os.environ, OMP_NUM_THREADS=str(threads)), 300)
        self.info = {"startup_s": time.perf_counter() - start, "versions": ready["versions"],
                     "settings": {"threads": threads, "n_seq_max": n_seq_max, "n_ctx": n_ctx,
                                  "kv_type": kv_type, "flash_attn": flash_attn, "gguf": str(self.gguf)},
                     "log": str(self.worker.log_path)}

    @property
    def idle_cpu_s(self) -> float:
        return self.worker.idle_cpu_s

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """One request: every prompt decoded together; see the worker for the fields."""
        return self.worker.request({"prompts": prompts, "new_tokens": new_tokens}, 1800)

    def close(self) -> None:
        self.worker.close(timeout_s=30)
