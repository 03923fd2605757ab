"""A benchmark peer's long-lived worker process, stopped (SIGSTOP) between its turns.

The peers (vLLM, llama.cpp) run in their own virtualenvs as workers that read one JSON request
per line on stdin and answer one JSON line on stdout; their logs go to a file. Between its turns
a worker's whole process group is stopped: idle, vLLM's processes still used ~25% of a core here,
and on 2 cores that slowed the engine being measured by up to a third (its parallel regions wait
for the core the peer shares). `idle_cpu_s` says how much CPU the workers used while stopped (it
should stay near 0).
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

from peers.proc_cpu import tree_cpu_seconds


class PausedWorker:
    """Starts `cmd`, waits for its first line (returned by `start`), then keeps it stopped
    except while `request` runs."""

    def __init__(self, name: str, log_name: str) -> None:
        self.name = name
        self.log_path = Path(tempfile.gettempdir()) / f"{log_name}-{os.getpid()}.log"
        self._log = open(self.log_path, "w")
        self.proc: subprocess.Popen | None = None
        self.idle_cpu_s = 0.0

    def start(self, cmd: list[str], env: dict[str, str], timeout_s: float) -> dict:
        """Launch the worker and return its ready line; stopped afterwards."""
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=env, start_new_session=True)
        try:
            ready = self._read(timeout_s)
        except BaseException:
            self.close()
            raise
        self._pause()
        return ready

    def request(self, payload: dict, timeout_s: float) -> dict:
        """One request, the worker running only for it."""
        self._resume()
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout_s)
        self._pause()
        return reply

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def close(self, timeout_s: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped worker would never read EOF
            self.proc.stdin.close()  # the worker's loop ends at EOF
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def _pause(self) -> None:
        self._idle_mark = self.cpu_seconds()
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def _resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)
        self.idle_cpu_s += self.cpu_seconds() - self._idle_mark

    def _read(self, timeout_s: float) -> dict:
        # One line per request; a dead worker is reported with the tail of its log.
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = select.select([self.proc.stdout], [], [], 5.0)[0]
            line = self.proc.stdout.readline() if waiting else ""
            if line:
                return json.loads(line)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.flush()
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"{self.name} worker stopped (exit {self.proc.poll()}); "
                                   f"log {self.log_path}:\n{tail}")
