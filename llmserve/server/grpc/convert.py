"""gRPC messages <-> the HTTP API's request bodies and the engine's outputs.

A request is turned into the JSON body the HTTP API takes and validated by the same code
(`llmserve.batch.bodies.parse_body`), so both front ends accept and refuse the same things.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmserve.server.grpc import llmserve_pb2 as pb

if TYPE_CHECKING:
    from llmserve.outputs import CompletionOutput, RequestOutput

# Optional scalar fields copied as they are when the client set them.
_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed", "n", "skip_special_tokens")


def _sampling(opts: pb.SamplingOptions, chat: bool) -> dict:
    body: dict = {}
    for name in _OPTIONAL:
        if opts.HasField(name):
            value = getattr(opts, name)
            # float32 on the wire: keep 7 significant digits so 0.7 arrives as 0.7.
            body[name] = float(f"{value:.7g}") if isinstance(value, float) else value
    if opts.HasField("max_tokens"):
        body["max_tokens"] = opts.max_tokens
    if opts.stop:
        body["stop"] = list(opts.stop)
    if opts.stop_token_ids:
        body["stop_token_ids"] = list(opts.stop_token_ids)
    body["ignore_eos"] = opts.ignore_eos
    body["min_tokens"] = opts.min_tokens
    body["include_stop_str_in_output"] = opts.include_stop_str_in_output
    if opts.HasField("logprobs"):
        if chat:
            body.update(logprobs=True, top_logprobs=opts.logprobs)
        else:
            body["logprobs"] = opts.logprobs
    return body


def _common(req: pb.GenerateRequest | pb.ChatRequest, chat: bool) -> dict:
    body = _sampling(req.sampling, chat)
    if req.model:
        body["model"] = req.model
    if req.user:
        body["user"] = req.user
    if req.metadata:
        body["metadata"] = dict(req.metadata)
    body["priority"] = req.priority
    return body


def completion_body(req: pb.GenerateRequest) -> dict:
    """The /v1/completions body equivalent to a GenerateRequest."""
    body = _common(req, chat=False)
    which = req.WhichOneof("prompt")
    if which == "text":
        body["prompt"] = req.text
    elif which == "token_ids":
        body["prompt"] = list(req.token_ids.ids)
    return body  # no prompt at all: validation says "prompt: field required"


def chat_body(req: pb.ChatRequest) -> dict:
    """The /v1/chat/completions body equivalent to a ChatRequest."""
    body = _common(req, chat=True)
    body["messages"] = [
        {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
        for m in req.messages
    ]
    if req.HasField("add_generation_prompt"):
        body["add_generation_prompt"] = req.add_generation_prompt
    return body


def usage(out: RequestOutput) -> pb.Usage:
    """Usage so far (or final) of one request, counted as the HTTP API counts it."""
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return pb.Usage(prompt_tokens=prompt, cached_tokens=out.num_cached_tokens,
                    completion_tokens=completion, total_tokens=prompt + completion)


def token_logprobs(c: CompletionOutput, start: int, end: int, top: int | None,
                   tokenizer) -> list[pb.TokenLogprob]:
    """Logprobs of tokens [start, end) of a completion, each with its `top` alternatives."""
    if top is None or c.logprobs is None:
        return []
    entries = []
    for token_id, entry in zip(c.token_ids[start:end], c.logprobs[start:end], strict=False):
        chosen = entry.get(token_id)
        alternatives = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top]
        entries.append(pb.TokenLogprob(
            token_id=token_id, token=tokenizer.decode_token(token_id),
            logprob=chosen.logprob if chosen is not None else float("nan"),
            top_logprobs=[pb.TopLogprob(token_id=t, token=tokenizer.decode_token(t),
                                        logprob=lp.logprob) for t, lp in alternatives]))
    return entries


def response(request_id: str, model: str, created: int, out: RequestOutput,
             top: int | None, tokenizer) -> pb.GenerateResponse:
    completions = [
        pb.Completion(index=c.index, text=c.text, token_ids=c.token_ids,
                      finish_reason=c.finish_reason or "",
                      logprobs=token_logprobs(c, 0, len(c.token_ids), top, tokenizer))
        for c in out.outputs
    ]
    return pb.GenerateResponse(request_id=request_id, model=model, created=created,
                               completions=completions, usage=usage(out))
