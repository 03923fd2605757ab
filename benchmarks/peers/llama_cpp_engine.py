"""Client side of benchmarks/peers/llama_cpp_worker.py: llama.cpp as a peer of the CPU latency benchmark.

The checkpoint is converted to an f32 GGUF once (cached by the checkpoint's path and file times)
with llama.cpp's own converter, then the worker runs in the peer's virtualenv
(`make peer-llama-cpp`). Between its rounds the worker is stopped (SIGSTOP), as the vLLM peer is,
so that its OpenMP threads cannot take a core from the engine being measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peers.proc_cpu import tree_cpu_seconds

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
    """llama.cpp decoding greedily in a subprocess, paused between its rounds."""

    def __init__(self, checkpoint: str, threads: int, n_seq_max: int, n_ctx: int,
                 kv_type: str = "f32", flash_attn: str = "off") -> None:
        if not available():
            raise SystemExit(f"llama.cpp's virtualenv is missing ({venv_python()}); "
                             "run `make peer-llama-cpp` first")
        self.gguf = gguf_for(checkpoint)
        self.log_path = Path(tempfile.gettempdir()) / f"latency-llama-cpp-{os.getpid()}.log"
        self._log = open(self.log_path, "w")
        cmd = [str(venv_python()), str(WORKER), "--gguf", str(self.gguf), "--threads", str(threads),
               "--n-seq-max", str(n_seq_max), "--n-ctx", str(n_ctx), "--kv-type", kv_type,
               "--flash-attn", flash_attn]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=env, start_new_session=True)
        try:
            ready = self._read(300)
        except BaseException:
            self.close()
            raise
        self.info = {"startup_s": time.perf_counter() - start, "versions": ready["versions"],
                     "settings": {"threads": threads, "n_seq_max": n_seq_max, "n_ctx": n_ctx,
                                  "kv_type": kv_type, "flash_attn": flash_attn, "gguf": str(self.gguf)},
                     "log": str(self.log_path)}
        self.idle_cpu_s = 0.0
        self._pause()

    def _pause(self) -> None:
        self._idle_mark = tree_cpu_seconds(self.proc.pid)
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def _resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)
        self.idle_cpu_s += tree_cpu_seconds(self.proc.pid) - self._idle_mark

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """One request: every prompt decoded together; see the worker for the fields."""
        self._resume()
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(1800)
        self._pause()
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped worker would never read EOF
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def _read(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = select.select([self.proc.stdout], [], [], 5.0)[0]
            line = self.proc.stdout.readline() if waiting else ""
            if line:
                return json.loads(line)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.flush()
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"llama.cpp worker stopped (exit {self.proc.poll()}); "
                                   f"log {self.log_path}:\n{tail}")
