"""SIGTERM: new requests get 503, in-flight ones finish (or are aborted at the drain timeout),
and the process exits with status 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from live_server import live_server, sse_events, validate

CHAT = [{"role": "user", "content": "Hello"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")


class _Streamer(threading.Thread):
    """Streams one long completion and records its events; `started` fires on the first."""

    def __init__(self, base_url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base_url, self.max_tokens = base_url, max_tokens
        self.started = threading.Event()
        self.events: list[tuple[str | None, str]] = []

    def run(self) -> None:
        body = {"prompt": "Hello", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", self.base_url + "/v1/completions", json=body,
                          timeout=60) as response:
            name = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    self.events.append((name, line[5:].strip()))
                    name = None
                    self.started.set()


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(c) for c in f.read().split()}
    except OSError:
        return set()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except OSError:
        return True


@pytest.mark.parametrize("engine_core", ["process", "thread"])
def test_sigterm_drains_in_flight_requests_and_exits_cleanly(checkpoint, engine_core):
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llmserve.cli", "serve", "--model", str(checkpoint),
           "--port", str(port), "--num-kv-blocks", "128", "--max-model-len", "1024",
           "--drain-timeout", "60", "--log-level", "warning", "--engine-core", engine_core]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    children: set[int] = set()
    try:
        _wait_healthy(base_url, proc)
        children = _children(proc.pid)
        if engine_core == "process" and os.path.exists(f"/proc/{proc.pid}/task"):
            assert children, "the engine core should be a child process"
        # Long enough to still be streaming when the refused request is checked: with the fused
        # CPU forward 300 tokens could finish within the health-polling window.
        streamer = _Streamer(base_url, max_tokens=1000)
        streamer.start()
        assert streamer.started.wait(30)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(base_url + "/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = httpx.post(base_url + "/v1/completions", json={"prompt": "Hi"})
        assert refused.status_code == 503 and streamer.is_alive()
        validate("ErrorResponse", refused.json())
        streamer.join(60)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while not all(_gone(c) for c in children):  # the engine core does not outlive the server
        assert time.monotonic() < deadline, children
        time.sleep(0.05)
    assert streamer.events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for name, data in streamer.events[:-1]]
    assert all(name is None for name, _ in streamer.events)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_drain_timeout_aborts_what_is_left_with_an_error_event(checkpoint):
    with live_server(checkpoint) as live:
        live.server.drain_timeout = 0.3
        result: list = []
        body = {"messages": CHAT, "max_tokens": 480, "ignore_eos": True, "stream": True}
        worker = threading.Thread(target=lambda: result.extend(
            sse_events(live.base_url, "/v1/chat/completions", body)))
        worker.start()
        deadline = time.monotonic() + 10
        while live.engine.num_unfinished == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        live.server.begin_drain()
        worker.join(30)
        assert result[-1] == (None, "[DONE]")
        name, data = result[-2]
        assert name == "error" and json.loads(data)["error"]["code"] == "request_aborted"
        deadline = time.monotonic() + 10
        while not live.server.should_exit:
            assert time.monotonic() < deadline
            time.sleep(0.05)
