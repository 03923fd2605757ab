"""Fixtures of the trace-ledger tests: a tiny checkpoint and a traced server on loopback."""

from __future__ import annotations

import contextlib
import pathlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# Small pools and batches: the tests share two CPU cores with other work.
ENGINE_ARGS = {"num_kv_blocks": 128, "block_size": 16, "max_num_seqs": 16,
               "max_num_batched_tokens": 256, "max_model_len": 256}


@dataclass
class TracedServer:
    base_url: str
    db: str
    engine: object
    recorder: object


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
    from llmserve.models.random_checkpoint import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama",
                                   tokenizer="bpe")


@contextlib.contextmanager
def traced_server(checkpoint: pathlib.Path, db: pathlib.Path, pricing: str | None = None,
                  log_prompts: bool = False) -> Iterator[TracedServer]:
    """An OpenAI server with the trace ledger installed, in a background thread."""
    from llmserve.engine.async_engine import AsyncEngine
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.observability.recorder import TraceOptions, install_trace_ledger
    from llmserve.server.openai.app import create_app
    from llmserve.server.openai.server import build_server

    engine = AsyncEngine(LLMEngine.from_args(str(checkpoint), **ENGINE_ARGS))
    app = create_app(engine)
    recorder = install_trace_ledger(app, engine, TraceOptions(str(db), pricing, log_prompts))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(app, "127.0.0.1", port, drain_timeout=5.0, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield TracedServer(f"http://127.0.0.1:{port}", str(db), engine, recorder)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
