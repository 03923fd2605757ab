"""POST /v1/chat/completions: one engine request with `n` completions, via the request layer."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response

from llmserve.server.openai.context import get_context
from llmserve.server.openai.layer import prepare
from llmserve.server.openai.protocol import ChatCompletionRequest
from llmserve.server.openai.serving import new_id, respond, submit_all


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.check_model(body.model)
    prepared = prepare(body, ctx.view, model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    reply = prepared.reply(new_id("chatcmpl"), int(time.time()), include_usage)
    streams = await submit_all(ctx, request, reply.id, prepared, "chat.completions")
    return await respond(request, reply, streams, body.stream)
