"""POST /v1/chat/completions: chat template, then one engine request with `n` completions."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from llmserve.engine.async_engine import RequestStream
from llmserve.outputs import RequestOutput
from llmserve.server.openai.context import get_context
from llmserve.server.openai.logprobs import chat_logprobs
from llmserve.server.openai.protocol import ChatCompletionRequest
from llmserve.server.openai.serving import (
    ClientGone,
    RequestAborted,
    aborted_response,
    collect,
    dumps,
    new_id,
    sampling_params,
    sse_response,
    submit,
    usage,
)


@dataclass
class _Reply:
    """What every chunk / response of one chat request repeats."""

    id: str
    created: int
    model: str
    top_logprobs: int | None  # None: logprobs not requested
    include_usage: bool
    tokenizer: object

    def logprobs(self, token_ids: list[int], entries: list | None) -> dict | None:
        if self.top_logprobs is None or entries is None:
            return None
        return chat_logprobs(token_ids, entries, self.top_logprobs, self.tokenizer)

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage_
        return dumps(body)


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.check_model(body.model)
    tokenizer = ctx.engine.tokenizer
    conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = tokenizer.apply_chat_template(conversation,
                                         add_generation_prompt=body.add_generation_prompt)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, body.completion_limit, top)
    reply = _Reply(new_id("chatcmpl"), int(time.time()), model, top,
                   bool(body.stream_options and body.stream_options.include_usage), tokenizer)
    stream = await submit(ctx, request, reply.id, {"prompt_token_ids": prompt_ids}, params, body,
                          "chat.completions")
    if body.stream:
        return sse_response(_events(reply, stream, body.n), [stream])
    try:
        (out,) = await collect(request, [stream])
    except ClientGone:
        return Response(status_code=499)
    except RequestAborted:
        raise aborted_response() from None
    return JSONResponse(_response(reply, out))


def _response(reply: _Reply, out: RequestOutput) -> dict:
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": reply.logprobs(c.token_ids, c.logprobs),
            "finish_reason": c.finish_reason,
        }
        for c in out.outputs
    ]
    return {"id": reply.id, "object": "chat.completion", "created": reply.created,
            "model": reply.model, "choices": choices, "usage": usage([out])}


async def _events(reply: _Reply, stream: RequestStream, n: int) -> AsyncGenerator[str, None]:
    for i in range(n):
        yield reply.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}])
    sent_chars, sent_tokens, done = [0] * n, [0] * n, [False] * n
    last = None
    async for out in stream:
        last = out
        for c in out.outputs:
            i = c.index
            if done[i]:
                continue
            if c.finish_reason == "abort":
                raise RequestAborted()
            delta = c.text[sent_chars[i]:]
            new_lps = None
            if reply.top_logprobs is not None and c.logprobs is not None:
                new_lps = c.logprobs[sent_tokens[i]:]
            if delta or new_lps:
                ids = c.token_ids[sent_tokens[i]:sent_tokens[i] + len(new_lps or ())]
                yield reply.chunk([{"index": i, "delta": {"content": delta},
                                    "logprobs": reply.logprobs(ids, new_lps),
                                    "finish_reason": None}])
                sent_chars[i] = len(c.text)
                sent_tokens[i] += len(new_lps or ())
            if c.finish_reason is not None:
                done[i] = True
                yield reply.chunk([{"index": i, "delta": {}, "logprobs": None,
                                    "finish_reason": c.finish_reason}])
    if last is None or not all(done):
        raise RequestAborted()
    if reply.include_usage:
        yield reply.chunk([], usage([last]))
