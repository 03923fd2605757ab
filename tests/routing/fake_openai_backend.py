"""A tiny OpenAI-compatible backend for router tests, in-process or as a subprocess.

It answers /v1/chat/completions and /v1/completions (streamed or not) with a fixed text, after a
configurable latency, and can be told to fail, to slow down or to fail its health check through
``POST /_control``. ``GET /_stats`` tells what it received. Run as a script it binds the port
given (0 = any), prints ``PORT <n>`` and serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field, fields

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Behaviour:
    version: str = "v1"
    model_version: str | None = None  # sent as the X-Model-Version header when set
    text: str = "hello from v1"
    latency: float = 0.0  # seconds before the first token (or the whole answer)
    token_delay: float = 0.0  # seconds between streamed tokens
    fail: bool = False  # answer 500 with an error envelope
    health_status: int = 200
    received: list[dict] = field(default_factory=list)


def _chunk(kind: str, model: str, rid: str, piece: str | None, finish: str | None) -> bytes:
    if kind == "chat":
        choice = {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish}
        obj = "text_completion"
    payload = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
               "choices": [choice]}
    return f"data: {json.dumps(payload)}\n\n".encode()


def make_app(b: Behaviour) -> Starlette:
    """The backend app, driven by the (mutable) behaviour ``b``."""

    async def generate(request: Request, kind: str) -> Response:
        body = await request.json()
        b.received.append({"body": body, "headers": dict(request.headers), "at": time.time()})
        if b.latency:
            await asyncio.sleep(b.latency)
        if b.fail:
            return JSONResponse({"error": {"message": f"{b.version} is broken", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)
        headers = {"x-model-version": b.model_version} if b.model_version else {}
        words = b.text.split(" ")
        pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        model, rid = body.get("model", "m"), f"cmpl-{uuid.uuid4().hex[:12]}"
        usage = {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}
        if body.get("stream"):
            async def events():
                for piece in pieces:
                    yield _chunk(kind, model, rid, piece, None)
                    if b.token_delay:
                        await asyncio.sleep(b.token_delay)
                yield _chunk(kind, model, rid, None, "stop")
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({'id': rid, 'choices': [], 'usage': usage})}\n\n".encode()
                yield b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                  if kind == "chat" else {"index": 0, "text": text, "finish_reason": "stop"})
        return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "created": int(time.time()), "model": model, "choices": [choice],
                             "usage": usage, "version": b.version}, headers=headers)

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "text")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": b.version}, status_code=b.health_status)

    async def control(request: Request) -> Response:
        names = {f.name for f in fields(Behaviour)} - {"received"}
        for key, value in (await request.json()).items():
            if key in names:
                setattr(b, key, value)
        return JSONResponse({"ok": True})

    async def stats(request: Request) -> Response:
        return JSONResponse({"version": b.version, "requests": len(b.received)})

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health), Route("/_control", control, methods=["POST"]),
        Route("/_stats", stats),
    ])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--version", default="v1")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args()
    b = Behaviour(version=args.version, text=f"hello from {args.version}", latency=args.latency,
                  token_delay=args.token_delay)
    # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets of an explicit TCP
    # protocol; without it every response waits ~40 ms on delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)  # connections queue from now on, before uvicorn is up
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(make_app(b), log_level="warning", access_log=False))
    server.run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
