"""Start the gRPC server (Generation + grpc.health.v1 + reflection) beside the HTTP one.

    server = await start_grpc_server(async_engine, 50051, GrpcOptions(api_keys=("k",)))
    ...
    await server.stop()

`attach_grpc(app, async_engine, port, options)` does the same inside a FastAPI app's lifespan,
so `llmserve serve --grpc-port N` serves both front ends on one engine and one event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmserve.server.grpc.llmserve_pb2_grpc import add_GenerationServicer_to_server
from llmserve.server.grpc.options import GrpcOptions
from llmserve.server.grpc.servicer import SERVICE_NAME, GenerationServicer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llmserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)
# How often the health service re-reads the engine's state.
HEALTH_POLL_S = 1.0


@dataclass
class GrpcServer:
    """A running gRPC server and the port it is bound to."""

    server: grpc.aio.Server
    port: int
    servicer: GenerationServicer
    health: health.aio.HealthServicer
    _watch: asyncio.Task

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let running ones finish for `grace` seconds, then stop."""
        self.servicer.stopping = True
        self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.servicer.options.grace_s if grace is None else grace)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_grpc_server(engine: AsyncEngine, port: int,
                            options: GrpcOptions | None = None) -> GrpcServer:
    """Serve `llmserve.v1.Generation` on `options.host:port` (port 0 picks a free one).

    Must run on the event loop the engine's consumers use (the HTTP server's loop).
    Raises ValueError for a bad port or when the address cannot be bound.
    """
    options = options or GrpcOptions()
    if not 0 <= port < 65536:
        raise ValueError(f"gRPC port must be in 0..65535, got {port}")
    limit = options.max_message_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)])
    servicer = GenerationServicer(engine, options)
    add_GenerationServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if options.reflection:
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    try:
        bound = server.add_insecure_port(f"{options.host}:{port}")
    except RuntimeError as exc:
        raise ValueError(f"cannot bind gRPC to {options.host}:{port}: {exc}") from None
    if bound == 0:
        raise ValueError(f"cannot bind gRPC to {options.host}:{port} (address in use?)")
    engine.start()
    await server.start()
    watch = asyncio.ensure_future(_watch_health(engine, health_servicer))
    logger.info("gRPC server listening on %s:%d", options.host, bound)
    return GrpcServer(server, bound, servicer, health_servicer, watch)


async def _watch_health(engine: AsyncEngine, servicer: health.aio.HealthServicer) -> None:
    """Publish SERVING / NOT_SERVING for the server ("") and the Generation service."""
    status = None
    while True:
        new = (health_pb2.HealthCheckResponse.SERVING if engine.is_healthy
               else health_pb2.HealthCheckResponse.NOT_SERVING)
        if new != status:
            status = new
            for name in ("", SERVICE_NAME):
                await servicer.set(name, status)
        await asyncio.sleep(HEALTH_POLL_S)


def attach_grpc(app: FastAPI, engine: AsyncEngine, port: int,
                options: GrpcOptions | None = None) -> None:
    """Run a gRPC server for the app's lifetime (started after the app's own start-up).

    gRPC calls then share the HTTP server's drain: they count as in flight, and new ones get
    UNAVAILABLE once a drain began. The running server is `app.state.grpc_server`.
    """
    options = options or GrpcOptions()
    if options.context is None:
        options = replace(options, context=getattr(app.state, "ctx", None))
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator:
        async with inner(a) as state:
            server = await start_grpc_server(engine, port, options)
            a.state.grpc_server = server
            try:
                yield state
            finally:
                await server.stop()

    app.router.lifespan_context = lifespan


def attach_grpc_from_args(app: FastAPI, engine: AsyncEngine, args: argparse.Namespace,
                          served_model_names: list[str] | None, api_keys: list[str]) -> None:
    """`attach_grpc` when `--grpc-port` was given."""
    if args.grpc_port is None:
        return
    if not 0 < args.grpc_port < 65536:
        raise ValueError(f"--grpc-port must be in 1..65535, got {args.grpc_port}")
    if args.grpc_port == getattr(args, "port", None):
        raise ValueError("--grpc-port must differ from --port")
    attach_grpc(app, engine, args.grpc_port, GrpcOptions(
        host=args.host, served_model_names=served_model_names, api_keys=tuple(api_keys)))
