"""Durability: a row of a completed response survives `kill -9` of a real server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from llmserve.observability.ledger import find_row


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


@pytest.mark.timeout(300)
def test_kill_9_right_after_responses_loses_no_row(tiny_checkpoint, tmp_path):
    db = tmp_path / "traces.db"
    port = _free_port()
    cmd = [sys.executable, "-m", "llmserve.cli", "serve", "--model", str(tiny_checkpoint),
           "--port", str(port), "--trace-db", str(db), "--num-kv-blocks", "64",
           "--max-model-len", "256", "--max-num-batched-tokens", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3}
        plain = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert plain.status_code == 200
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as resp:
            lines = [line for line in resp.iter_lines() if line.startswith("data:")]
            streamed_trace = resp.headers["x-trace-id"]
        assert lines[-1] == "data: [DONE]"
        proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: only committed rows remain
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    row = find_row(db, request_id=plain.json()["id"])
    assert row is not None and row["status"] == "ok"
    assert row["trace_id"] == plain.headers["x-trace-id"]
    streamed = find_row(db, trace_id=streamed_trace)
    assert streamed is not None and streamed["status"] == "ok"
