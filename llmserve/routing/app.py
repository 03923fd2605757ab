"""The router's HTTP app: OpenAI endpoints in front, an authenticated admin API on the side.

Front: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming passed through),
``GET /v1/models``, ``GET /health``, ``GET /metrics``. Admin (``Authorization: Bearer <token>``):
``GET /admin/status``, ``GET /admin/events``, ``POST /admin/promote``, ``/admin/rollback``,
``/admin/weight``, ``/admin/reload``. Without a configured admin token the admin API refuses
every call, so routing can never be changed by an unauthenticated client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from llmserve.routing.proxy import error_response, handle
from llmserve.routing.router import Router

log = logging.getLogger("llmserve.router")


class _RouterCollector:
    """Prometheus metrics read from the router's counters at scrape time (no hot-path cost)."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self):
        requests = CounterMetricFamily("llmserve:router_requests", "Requests by route",
                                       labels=["model", "deployment", "route", "status"])
        for (model, dep, route, status), n in self._router.accounts.counts.items():
            requests.add_metric([model, dep, route, status], n)
        weight = GaugeMetricFamily("llmserve:router_canary_weight_perc", "Canary weight",
                                   labels=["model", "deployment"])
        dropped = CounterMetricFamily("llmserve:router_shadow_dropped", "Shadow jobs dropped",
                                      labels=["model"])
        for name, state in self._router.models.items():
            if state.canary:
                weight.add_metric([name, state.canary], state.canary_weight)
            if state.mirror is not None:
                dropped.add_metric([name], state.mirror.dropped)
        healthy = GaugeMetricFamily("llmserve:router_replica_healthy", "1 if in rotation",
                                    labels=["url"])
        for replica in self._router.registry.all():
            healthy.add_metric([replica.url], 1.0 if replica.healthy else 0.0)
        yield from (requests, weight, dropped, healthy)


def _sighup(router: Router) -> None:
    try:
        router.reload(actor="SIGHUP")
    except ValueError as exc:  # a bad file keeps the running config
        log.error("config reload on SIGHUP failed, keeping the running config: %s", exc)


def create_app(router: Router, handle_sighup: bool = False) -> FastAPI:
    """Build the router app; ``handle_sighup`` reloads the config file on SIGHUP."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        loop = asyncio.get_running_loop()
        if handle_sighup:
            loop.add_signal_handler(signal.SIGHUP, _sighup, router)
        try:
            yield
        finally:
            if handle_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await router.stop()

    app = FastAPI(title="llmserve router", lifespan=lifespan)
    app.state.router = router

    async def chat(request: Request) -> Response:
        return await handle(router, request.headers, await request.body(), "/v1/chat/completions")

    async def completions(request: Request) -> Response:
        return await handle(router, request.headers, await request.body(), "/v1/completions")

    # Plain Starlette routes: the hot path skips FastAPI's dependency and validation layers.
    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    metrics_registry = CollectorRegistry()
    metrics_registry.register(_RouterCollector(router))  # type: ignore[arg-type]

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "llmserve-router"}
            for name in router.models]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(metrics_registry), media_type="text/plain; version=0.0.4")

    _add_admin(app, router)
    _add_error_handlers(app)
    return app


def _authorized(router: Router, request: Request) -> JSONResponse | None:
    """None when the caller holds the admin token, else the error response to send."""
    token = router.config.admin_token
    if not token:
        return error_response(403, "the admin API is disabled: set admin_token (or "
                              "admin_token_env) in the router config", "permission_error")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return error_response(401, "missing or wrong admin token", "authentication_error")
    return None


async def _json(request: Request) -> dict[str, Any]:
    try:
        data = await request.json() if await request.body() else {}
    except ValueError:
        raise ValueError("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    return data


def _add_admin(app: FastAPI, router: Router) -> None:
    def admin(path: str, method: str, action):
        async def endpoint(request: Request) -> Response:
            denied = _authorized(router, request)
            if denied is not None:
                return denied
            try:
                return JSONResponse(action(await _json(request), request))
            except ValueError as exc:
                return error_response(400, str(exc))
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)

    def actor(data: dict) -> str:
        return str(data.get("actor") or "admin")

    admin("/admin/status", "GET", lambda d, r: router.status())
    admin("/admin/events", "GET", lambda d, r: {"events": router.events.recent(
        int(r.query_params.get("limit", 100)), r.query_params.get("kind"))})
    admin("/admin/promote", "POST", lambda d, r: router.promote(
        _str(d, "model"), d.get("deployment"), actor(d), str(d.get("reason") or "")))
    admin("/admin/rollback", "POST", lambda d, r: router.rollback(
        _str(d, "model"), str(d.get("reason") or ""), actor(d)))
    admin("/admin/weight", "POST", lambda d, r: router.set_weight(
        _str(d, "model"), d.get("weight"), actor(d), str(d.get("reason") or "")))
    admin("/admin/reload", "POST", lambda d, r: router.reload(actor=actor(d)))


def _str(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{key}' is required and must be a string")
    return value


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail),
                              "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, str(exc))
