"""Run the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

First signal: new requests get 503 at once, in-flight ones run to completion for up to
`drain_timeout` seconds, then whatever is left is aborted (streams get an error event), and
uvicorn shuts down. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Generator, Iterator

import uvicorn
from fastapi import FastAPI

from llmserve.server.openai.context import ServerContext

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal first drains in-flight requests."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext,
                 drain_timeout: float = 30.0) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.ctx.draining or self._loop is None:
            self.force_exit = True
            self.should_exit = True
            return
        self.begin_drain()

    def begin_drain(self) -> None:
        """Stop admitting and start the drain (safe from a signal handler or another thread)."""
        self.ctx.draining = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain_task)

    def _start_drain_task(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        logger.info("draining: %d request(s) in flight", self.ctx.in_flight)
        if not await _wait_for(lambda: self.ctx.in_flight == 0, self.drain_timeout):
            logger.warning("drain timeout after %.0fs: aborting %d request(s)",
                           self.drain_timeout, self.ctx.in_flight)
            self.ctx.engine.abort_all()
            await _wait_for(lambda: self.ctx.in_flight == 0, 5.0)
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Our own handlers, restored afterwards without re-raising the signal, so a drained
        # server exits with status 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def build_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                 drain_timeout: float = 30.0, log_level: str = "info") -> DrainingServer:
    """A DrainingServer for an app from `create_app` (call `.run()` to serve)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5, lifespan="on")
    return DrainingServer(config, app.state.ctx, drain_timeout=drain_timeout)


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", drain_timeout: float = 5.0,
                        log_level: str = "warning",
                        start_timeout: float = 60.0) -> Iterator[tuple[str, DrainingServer]]:
    """Serve `app` on a free port in a daemon thread (tests, examples, embedding); yields
    (base URL, server) and stops the server on exit."""
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say so, and without
    # it every small response waits for the peer's delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = build_server(app, host, port, drain_timeout=drain_timeout, log_level=log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server on {host}:{port} did not start")
            time.sleep(0.02)
        yield f"http://{host}:{port}", server
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
