"""ServerContext: what every route needs (engine, served names, limits, drain state)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from llmserve.server.openai.layer import ModelView, check_model

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from llmserve.engine.async_engine import AsyncEngine

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class ServerContext:
    """Shared state of one API server.

    Attributes:
        engine: the AsyncEngine serving every request.
        served_model_names: names accepted in the `model` field; the first is reported back.
        api_keys: accepted bearer tokens; empty means no authentication.
        max_body_bytes: larger request bodies get 413.
        registry: the Prometheus registry behind /metrics (None: /metrics is empty).
        draining: set on SIGTERM; new requests get 503 while in-flight ones finish.
        tool_call_parser: name of the parser of `tools` calls (None: tools get 400).
        reasoning_parser: name of the parser of `<think>` reasoning (None: not split out).
    """

    engine: AsyncEngine
    served_model_names: list[str]
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    registry: CollectorRegistry | None = None
    draining: bool = False
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def view(self) -> ModelView:
        """The served model as the request layer sees it."""
        engine = self.engine
        return ModelView(engine.tokenizer, self.served_model_names, engine.max_model_len,
                         self.tool_call_parser, self.reasoning_parser)

    def check_model(self, name: str | None) -> str:
        """The name to report for a request's `model`; 404 for a model this server lacks."""
        return check_model(name, self.served_model_names)


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx
