"""gRPC messages <-> the HTTP API's request bodies and the engine's outputs.

A request is turned into the JSON body the HTTP API takes and goes through the same request
layer (`llmserve.server.openai.layer`), so both front ends accept and refuse the same things.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llmserve.server.grpc import llmserve_pb2 as pb
from llmserve.server.openai.layer import usage as openai_usage

if TYPE_CHECKING:
    from llmserve.outputs import CompletionOutput, RequestOutput
    from llmserve.server.openai.layer import Reply

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
    if opts.logit_bias:
        body["logit_bias"] = {str(k): float(f"{v:.7g}") for k, v in opts.logit_bias.items()}
    if opts.HasField("response_format"):
        body["response_format"] = _response_format(opts.response_format)
    if opts.HasField("structured_outputs"):
        body["structured_outputs"] = _structured_outputs(opts.structured_outputs)
    return body


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{field} must be JSON text") from None


def _response_format(fmt: pb.ResponseFormat) -> dict:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    schema: dict[str, Any] = {"name": fmt.schema_name or "response"}
    if fmt.schema_json:
        schema["schema"] = _json(fmt.schema_json, "response_format.schema_json")
    if fmt.HasField("strict"):
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def _structured_outputs(so: pb.StructuredOutputs) -> dict:
    which = so.WhichOneof("kind")
    if which is None:
        return {}  # validation says "exactly one of ..."
    if which == "json":
        return {"json": _json(so.json, "structured_outputs.json")}
    if which == "choice":
        return {"choice": list(so.choice.values)}
    return {which: getattr(so, which)}


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
    body["messages"] = [_message(m) for m in req.messages]
    if req.HasField("add_generation_prompt"):
        body["add_generation_prompt"] = req.add_generation_prompt
    if req.tools:
        body["tools"] = [_tool(t) for t in req.tools]
    which = req.tool_choice.WhichOneof("choice") if req.HasField("tool_choice") else None
    if which == "mode":
        body["tool_choice"] = req.tool_choice.mode
    elif which == "function_name":
        body["tool_choice"] = {"type": "function",
                               "function": {"name": req.tool_choice.function_name}}
    if req.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = req.parallel_tool_calls
    return body


def _message(m: pb.ChatMessage) -> dict:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        message["name"] = m.name
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def _tool(t: pb.Tool) -> dict:
    function: dict[str, Any] = {"name": t.name}
    if t.description:
        function["description"] = t.description
    if t.parameters_json:
        function["parameters"] = _json(t.parameters_json, f"tools[{t.name}].parameters_json")
    if t.HasField("strict"):
        function["strict"] = t.strict
    return {"type": "function", "function": function}


def usage(out: RequestOutput) -> pb.Usage:
    """Usage so far (or final) of one request, counted as the HTTP API counts it."""
    u = openai_usage([out])
    return pb.Usage(prompt_tokens=u["prompt_tokens"],
                    cached_tokens=u["prompt_tokens_details"]["cached_tokens"],
                    completion_tokens=u["completion_tokens"], total_tokens=u["total_tokens"])


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
             top: int | None, tokenizer, reply: Reply) -> pb.GenerateResponse:
    completions = []
    for c in out.outputs:
        completion = pb.Completion(index=c.index, text=c.text, token_ids=c.token_ids,
                                   finish_reason=c.finish_reason or "",
                                   logprobs=token_logprobs(c, 0, len(c.token_ids), top,
                                                           tokenizer))
        if reply.spec.chat:
            message, finish = reply.chat_message(c)
            completion.finish_reason = finish or ""
            completion.content = message.get("content") or ""
            completion.reasoning_content = message.get("reasoning_content") or ""
            completion.tool_calls.extend(
                pb.ToolCall(id=t["id"], name=t["function"]["name"],
                            arguments=t["function"]["arguments"])
                for t in message.get("tool_calls", ()))
        completions.append(completion)
    return pb.GenerateResponse(request_id=request_id, model=model, created=created,
                               completions=completions, usage=usage(out))


def message_parts(chunk: pb.GenerateStreamChunk, parts: list[dict]) -> bool:
    """Add a chat stream's delta fragments to a chunk; True if one was a tool call."""
    called = False
    for part in parts:
        chunk.content += part.get("content") or ""
        chunk.reasoning_content += part.get("reasoning_content") or ""
        for call in part.get("tool_calls", ()):
            called = True
            fn = call["function"]
            chunk.tool_calls.append(pb.ToolCallDelta(
                index=call["index"], id=call.get("id", ""), name=fn.get("name", ""),
                arguments=fn.get("arguments", "")))
    return called
