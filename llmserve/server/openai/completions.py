"""POST /v1/completions: one engine request per prompt, `n` completions each.

Choice `index` is `prompt_index * n + completion_index`, as OpenAI numbers them.
"""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response

from llmserve.server.openai.context import get_context
from llmserve.server.openai.layer import prepare
from llmserve.server.openai.protocol import CompletionRequest
from llmserve.server.openai.serving import new_id, respond, submit_all


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.check_model(body.model)
    prepared = prepare(body, ctx.view, model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    reply = prepared.reply(new_id("cmpl"), int(time.time()), include_usage)
    streams = await submit_all(ctx, request, reply.id, prepared, "completions")
    return await respond(request, reply, streams, body.stream)
