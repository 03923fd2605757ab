"""Client side of benchmarks/peers/vllm_offline.py: vLLM-CPU as an engine of benchmarks/throughput.py.

The worker runs in vLLM's own virtualenv and is started once; `run` sends it one round of
prompts (token ids) and returns what throughput.py records for every engine. Between its rounds
the worker's processes are stopped (SIGSTOP, SIGCONT before its next round): idle, vLLM's
processes still used ~25% of a core here, and on 2 cores that slowed the engine being measured
by up to a third (its parallel regions wait for the core that vLLM shares). `idle_cpu_s` says
how much CPU they used while paused (it should stay near 0).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from peers import vllm_settings
from peers.proc_cpu import tree_cpu_seconds

WORKER = Path(__file__).with_name("vllm_offline.py")
START_TIMEOUT_S = 900  # a cold torch.compile on a loaded 2-core machine took ~160 s


class VllmOfflinePeer:
    """vLLM's offline LLM in a subprocess, same checkpoint and scheduler budgets as llmserve."""

    def __init__(self, model: str, dtype: str, seed: int, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        if not vllm_settings.available():
            raise SystemExit(f"vLLM's virtualenv is missing ({vllm_settings.vllm_python()}); "
                             "run `make peer-vllm` first")
        self.log_path = Path(tempfile.gettempdir()) / f"throughput-vllm-{os.getpid()}.log"
        self._log = open(self.log_path, "w")
        cmd = [str(vllm_settings.vllm_python()), str(WORKER), "--model", model, "--dtype", dtype,
               "--seed", str(seed), "--max-num-seqs", str(max_num_seqs),
               "--max-num-batched-tokens", str(max_num_batched_tokens)]
        self.settings = vllm_settings.record()
        self.settings.update(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=vllm_settings.environment(),
                                     start_new_session=True)
        try:
            ready = self._read(START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.info = {"startup_s": time.perf_counter() - start, "versions": ready["versions"],
                     "settings": self.settings, "log": str(self.log_path)}
        self.idle_cpu_s = 0.0
        self._pause()

    def _pause(self) -> None:
        self._idle_mark = self.cpu_seconds()
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def _resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)
        self.idle_cpu_s += self.cpu_seconds() - self._idle_mark

    def run(self, prompts: list[list[int]], out_lens: list[int], return_tokens: int) -> dict:
        self._resume()
        request = {"prompts": prompts, "max_tokens": out_lens, "return_tokens": return_tokens}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._read(3600)
        self._pause()
        return {"elapsed_s": reply["elapsed_s"], "output_tokens": reply["output_tokens"],
                "peak_memory_mib": reply["rss_mib"], "token_ids": reply["token_ids"]}

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped worker would never read EOF
            self.proc.stdin.close()  # the worker's loop ends at EOF and vLLM shuts down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def _read(self, timeout_s: float) -> dict:
        # The worker answers one line per request; a dead worker is reported with its log.
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = select.select([self.proc.stdout], [], [], 5.0)[0]
            line = self.proc.stdout.readline() if waiting else ""
            if line:
                return json.loads(line)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.flush()
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"vLLM worker stopped (exit {self.proc.poll()}); "
                                   f"log {self.log_path}:\n{tail}")
