"""POST /v1/completions: one engine request per prompt, `n` completions each.

Choice `index` is `prompt_index * n + completion_index`, as OpenAI numbers them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from llmserve.engine.async_engine import RequestStream
from llmserve.outputs import CompletionOutput, RequestOutput
from llmserve.server.openai.context import get_context
from llmserve.server.openai.logprobs import completion_logprobs
from llmserve.server.openai.protocol import CompletionRequest
from llmserve.server.openai.serving import (
    ClientGone,
    RequestAborted,
    aborted_response,
    collect,
    dumps,
    merge,
    new_id,
    sampling_params,
    sse_response,
    submit_all,
    usage,
)


@dataclass
class _Reply:
    id: str
    created: int
    model: str
    n: int
    top_logprobs: int | None
    include_usage: bool
    echo: list[str] | None  # prompt texts to prepend, when echo is on
    tokenizer: object

    def choice(self, prompt_index: int, c: CompletionOutput, text: str, first_token: int,
               offset: int, finish_reason: str | None) -> dict:
        logprobs = None
        if self.top_logprobs is not None and c.logprobs is not None:
            entries = c.logprobs[first_token:]
            ids = c.token_ids[first_token:first_token + len(entries)]
            logprobs = completion_logprobs(ids, entries, self.top_logprobs, self.tokenizer, offset)
        return {"index": prompt_index * self.n + c.index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def body(self, choices: list[dict], usage_: dict | None = None, final: bool = True) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices}
        # The completion schema has no null usage, so only the last chunk carries it.
        if final:
            body["usage"] = usage_
        return body


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.check_model(body.model)
    prompts = body.prompts()
    tokenizer = ctx.engine.tokenizer
    echo = None
    if body.echo:
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
    params = sampling_params(body, body.max_tokens, body.logprobs)
    reply = _Reply(new_id("cmpl"), int(time.time()), model, body.n, body.logprobs,
                   bool(body.stream_options and body.stream_options.include_usage), echo,
                   tokenizer)
    # Text is tokenized here, in the server's process, so the engine's step loop does not pay for
    # it (the engine still checks the ids).
    engine_prompts = [{"prompt": p, "prompt_token_ids": tokenizer.encode(p)} if isinstance(p, str)
                      else {"prompt_token_ids": p} for p in prompts]
    streams = await submit_all(ctx, request, reply.id, engine_prompts, params, body,
                               "completions")
    if body.stream:
        return sse_response(_events(reply, streams), streams)
    try:
        outputs = await collect(request, streams)
    except ClientGone:
        return Response(status_code=499)
    except RequestAborted:
        raise aborted_response() from None
    return JSONResponse(_response(reply, outputs))


def _response(reply: _Reply, outputs: list[RequestOutput]) -> dict:
    choices = []
    for p, out in enumerate(outputs):
        prefix = reply.echo[p] if reply.echo else ""
        for c in out.outputs:
            choices.append(reply.choice(p, c, prefix + c.text, 0, len(prefix), c.finish_reason))
    return reply.body(choices, usage(outputs))


async def _events(reply: _Reply, streams: list[RequestStream]) -> AsyncGenerator[str, None]:
    n = reply.n
    total = n * len(streams)
    sent_chars, sent_tokens, done = [0] * total, [0] * total, [False] * total
    last: dict[int, RequestOutput] = {}
    if reply.echo:
        for p, text in enumerate(reply.echo):
            for i in range(n):
                yield dumps(reply.body([{"index": p * n + i, "text": text, "logprobs": None,
                                         "finish_reason": None}], final=False))
    async for p, out in merge(streams):
        last[p] = out
        for c in out.outputs:
            k = p * n + c.index
            if done[k]:
                continue
            if c.finish_reason == "abort":
                raise RequestAborted()
            delta = c.text[sent_chars[k]:]
            new_tokens = len(c.logprobs) - sent_tokens[k] if c.logprobs is not None else 0
            if delta or (reply.top_logprobs is not None and new_tokens > 0):
                choice = reply.choice(p, c, delta, sent_tokens[k], sent_chars[k], None)
                yield dumps(reply.body([choice], final=False))
                sent_chars[k] = len(c.text)
                sent_tokens[k] += max(new_tokens, 0)
            if c.finish_reason is not None:
                done[k] = True
                yield dumps(reply.body([{"index": k, "text": "", "logprobs": None,
                                         "finish_reason": c.finish_reason}], final=False))
    if len(last) < len(streams) or not all(done):
        raise RequestAborted()
    if reply.include_usage:
        yield dumps(reply.body([], usage([last[p] for p in range(len(streams))])))
