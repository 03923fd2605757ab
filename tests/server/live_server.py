"""Helpers of the server tests: live servers on loopback and OpenAI schema validation."""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import jsonschema

from llmserve.engine.async_engine import AsyncEngine
from llmserve.engine.llm_engine import LLMEngine
from llmserve.server.openai import create_app, serve_in_background

SCHEMAS = json.loads((pathlib.Path(__file__).parent / "openai_schemas.json").read_text())
# Small pools and batches: the tests share two CPU cores with other work.
ENGINE_ARGS = {"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 32,
               "max_num_batched_tokens": 512, "max_model_len": 512}


def process_engine(checkpoint: pathlib.Path, max_queued_requests: int = 1024,
                   **engine_args) -> AsyncEngine:
    """An AsyncEngine whose engine runs in its own process, as `llmserve serve` runs it."""
    return AsyncEngine.from_args(max_queued_requests, engine_process=True, cpu_threads=1,
                                 model=str(checkpoint), **{**ENGINE_ARGS, **engine_args})


def validate(name: str, instance: dict) -> None:
    """Validate `instance` against OpenAI's schema `name` (from openai_schemas.json)."""
    schema = {"$schema": SCHEMAS["$schema"], "$defs": SCHEMAS["$defs"],
              "$ref": f"#/$defs/{name}"}
    jsonschema.Draft202012Validator(schema).validate(instance)


@dataclass
class LiveServer:
    base_url: str
    engine: AsyncEngine
    server: object

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def metric(self, name: str, **labels: str) -> float:
        """Current value of a series from /metrics (0 for a labelled series not yet seen)."""
        text = httpx.get(self.base_url + "/metrics").text
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        for line in text.splitlines():
            if line.startswith(name + "{") and all(w in line for w in wanted):
                return float(line.rsplit(" ", 1)[1])
        if labels:
            return 0.0
        raise KeyError(name)


@contextlib.contextmanager
def live_server(checkpoint: pathlib.Path, *, max_queued_requests: int = 1024,
                api_keys: tuple[str, ...] = (), max_body_bytes: int = 1 << 20,
                engine_process: bool = False, **engine_args) -> Iterator[LiveServer]:
    """Start a server in a background thread; stop it (and its engine) on exit.

    `engine_process=True` runs the engine in its own process, as `llmserve serve` does; the
    default keeps it in a thread so that tests can reach into the engine.
    """
    if engine_process:
        engine = process_engine(checkpoint, max_queued_requests, **engine_args)
    else:
        engine = AsyncEngine(LLMEngine.from_args(str(checkpoint), **{**ENGINE_ARGS, **engine_args}),
                             max_queued_requests=max_queued_requests)
    app = create_app(engine, api_keys=api_keys, max_body_bytes=max_body_bytes)
    with serve_in_background(app) as (url, server):
        yield LiveServer(url, engine, server)


def sse_events(base_url: str, path: str, body: dict, **kwargs) -> list[tuple[str | None, str]]:
    """POST `body` with streaming on and return the SSE events as (event name, data)."""
    events, name, data = [], None, []
    with httpx.stream("POST", base_url + path, json=body, timeout=60, **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                continue  # keep-alive comment
            if not line:
                if data:
                    events.append((name, "\n".join(data)))
                name, data = None, []
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
    if data:
        events.append((name, "\n".join(data)))
    return events


def stream_chunks(base_url: str, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a stream that must end with `data: [DONE]` and hold no error."""
    events = sse_events(base_url, path, {**body, "stream": True})
    assert events[-1] == (None, "[DONE]")
    assert all(name is None for name, _ in events), events
    return [json.loads(data) for _, data in events[:-1]]
