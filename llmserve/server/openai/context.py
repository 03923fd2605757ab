"""ServerContext: what every route needs (engine, served names, limits, drain state)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from llmserve.server.openai.errors import model_not_found

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
    """

    engine: AsyncEngine
    served_model_names: list[str]
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    registry: CollectorRegistry | None = None
    draining: bool = False
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> str:
        """The name to report for a request's `model`; 404 for a model this server lacks."""
        if name is None:
            return self.model_name
        if name in self.served_model_names:
            return name
        raise model_not_found(name)


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx
