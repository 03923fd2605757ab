"""Loopback helpers for router tests: in-process servers, subprocess backends, a router."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fake_openai_backend import Behaviour, make_app

from llmserve.routing.app import create_app
from llmserve.routing.config import parse_config
from llmserve.routing.router import Router

HERE = Path(__file__).resolve().parent


@asynccontextmanager
async def serve_app(app):
    """Serve ``app`` on a free loopback port inside the running event loop."""
    # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets of an explicit TCP
    # protocol; without it every response waits ~40 ms on delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@asynccontextmanager
async def backends(*behaviours: Behaviour):
    """Start one in-process fake backend per behaviour; yields their URLs."""
    stack = [serve_app(make_app(b)) for b in behaviours]
    urls = []
    try:
        for cm in stack:
            urls.append(await cm.__aenter__())
        yield urls
    finally:
        for cm in reversed(stack[: len(urls)]):
            await cm.__aexit__(None, None, None)


@asynccontextmanager
async def running_router(config: dict, tmp_path: Path | None = None, config_path: str | None = None):
    """A Router built from ``config`` and served in-process; yields (router, url)."""
    router = Router(parse_config(config, base_dir=tmp_path or "."), config_path=config_path)
    async with serve_app(create_app(router)) as url:
        yield router, url


def model_config(deployments: dict[str, list[str]], primary: str, owners: dict | None = None,
                 **extra) -> dict:
    """One model entry: deployments by name -> replica URLs."""
    owners = owners if owners is not None else {name: f"{name}-team@example.com" for name in deployments}
    deps = {name: {"owner": owners.get(name), "replicas": urls, "model_version": f"mv-{name}"}
            for name, urls in deployments.items()}
    for dep in deps.values():
        if dep["owner"] is None:
            del dep["owner"]
    return {"deployments": deps, "primary": primary, **extra}


def router_config(models: dict, **extra) -> dict:
    # Probes run often so that ejection tests are quick, but a probe may wait long: these
    # backends share one event loop with the router and the test's own clients, so on a
    # loaded 2-core CI machine a healthy backend can take over a second to accept a probe,
    # and a short timeout ejected every replica mid-test (503 no_healthy_replica).
    base = {"admin_token": "secret", "health": {"interval_s": 0.2, "timeout_s": 10,
                                                "unhealthy_threshold": 1, "healthy_threshold": 1}}
    return {**base, **extra, "models": models}


def spawn_backend(version: str, latency: float = 0.0, token_delay: float = 0.0):
    """A fake backend in its own process (so it can be killed); returns (process, url)."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fake_openai_backend.py"), "--version", version,
         "--latency", str(latency), "--token-delay", str(token_delay)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline().strip()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fake backend did not start: {line!r}")
    return proc, f"http://127.0.0.1:{line.split()[1]}"

