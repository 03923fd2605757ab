"""Fixtures of the trace-ledger tests: a tiny checkpoint and a traced server on loopback."""

from __future__ import annotations

import contextlib
import pathlib
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
                  log_prompts: bool = False, engine_process: bool = False
                  ) -> Iterator[TracedServer]:
    """An OpenAI server with the trace ledger installed, in a background thread (its engine in
    a thread, or in its own process as `llmserve serve` runs it)."""
    from llmserve.engine.async_engine import AsyncEngine
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.observability.trace_app import install_trace_ledger
    from llmserve.observability.trace_options import TraceOptions
    from llmserve.server.openai.app import create_app
    from llmserve.server.openai.server import serve_in_background

    if engine_process:
        engine = AsyncEngine.from_args(engine_process=True, cpu_threads=1, model=str(checkpoint),
                                       **ENGINE_ARGS)
    else:
        engine = AsyncEngine(LLMEngine.from_args(str(checkpoint), **ENGINE_ARGS))
    app = create_app(engine)
    recorder = install_trace_ledger(app, engine, TraceOptions(str(db), pricing, log_prompts))
    with serve_in_background(app) as (url, _server):
        yield TracedServer(url, str(db), engine, recorder)
