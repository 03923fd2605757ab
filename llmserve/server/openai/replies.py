"""Engine outputs → OpenAI bodies: responses, stream chunks and usage, for chat and completions.

A `Reply` is made per request by the request layer (`layer.py`); HTTP, gRPC and batch jobs all
build their answers with it, so the same outputs read the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmserve.server.openai.deltas import Delta, DeltaTracker, RequestAborted
from llmserve.server.openai.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs
from llmserve.server.openai.shapes import PlainText, TextShape

if TYPE_CHECKING:
    from llmserve.outputs import CompletionOutput, RequestOutput


def usage(outputs: list[RequestOutput]) -> dict:
    """OpenAI's usage of a request's final (or latest) outputs, one per prompt."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class OutputSpec:
    """What turning a request's outputs into OpenAI bodies needs to know about the request."""

    chat: bool
    n: int
    top_logprobs: int | None  # None: logprobs not requested
    tokenizer: Any
    echo: list[str] | None = None  # completions: prompt texts to prepend
    echo_logprobs: bool = False  # completions: echo's logprobs come from prompt_logprobs
    prompt_logprobs: bool = False  # answer vLLM's `prompt_logprobs` field
    # Chat: a fresh splitter of one choice's text into content / reasoning / tool calls.
    shape: Callable[[], TextShape] = field(default=PlainText)


class Reply:
    """The id, model and options that every response and chunk of one request repeats."""

    def __init__(self, spec: OutputSpec, request_id: str, created: int, model: str,
                 include_usage: bool = False) -> None:
        self.spec = spec
        self.id = request_id
        self.created = created
        self.model = model
        self.include_usage = include_usage

    def response(self, outputs: list[RequestOutput]) -> dict:
        """The whole (non-streamed) response body."""
        if self.spec.chat:
            return self._chat_response(outputs[0])
        return self._completion_response(outputs)

    def writer(self) -> ChunkWriter:
        """A fresh stream of chunks for this request."""
        return ChunkWriter(self)

    # -- chat ----------------------------------------------------------------------------------
    def chat_logprobs(self, token_ids: list[int], entries: list | None) -> dict | None:
        top = self.spec.top_logprobs
        if top is None or entries is None:
            return None
        return chat_logprobs(token_ids, entries, top, self.spec.tokenizer)

    def chat_chunk(self, choices: list[dict], usage_: dict | None = None) -> dict:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage_
        return body

    def chat_message(self, c: CompletionOutput) -> tuple[dict, str | None]:
        """A final completion's message fields (content, reasoning, tool calls) and its
        finish reason ("tool_calls" when it stopped after calling tools)."""
        message, calls = self.spec.shape().message(c.text)
        return message, "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason

    def _chat_response(self, out: RequestOutput) -> dict:
        choices = []
        for c in out.outputs:
            message, finish = self.chat_message(c)
            choices.append({"index": c.index,
                            "message": {"role": "assistant", **message, "refusal": None},
                            "logprobs": self.chat_logprobs(c.token_ids, c.logprobs),
                            "finish_reason": finish})
        body = {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": usage([out])}
        if self.spec.prompt_logprobs:
            body["prompt_logprobs"] = self._prompt_logprobs(out)
        return body

    def _prompt_logprobs(self, out: RequestOutput) -> list | None:
        return prompt_logprobs(getattr(out, "prompt_logprobs", None), self.spec.tokenizer)

    # -- completions ---------------------------------------------------------------------------
    def completion_choice(self, prompt_index: int, c: CompletionOutput, text: str,
                          first_token: int, offset: int, finish_reason: str | None,
                          prompt: RequestOutput | None = None) -> dict:
        """One choice; logprobs cover tokens from `first_token` (and the prompt, if given)."""
        logprobs = None
        top = self.spec.top_logprobs
        if top is not None and c.logprobs is not None:
            entries = c.logprobs[first_token:]
            ids = c.token_ids[first_token:first_token + len(entries)]
            if prompt is not None:
                ids, entries = _with_prompt(prompt, ids, entries)
            logprobs = completion_logprobs(ids, entries, top, self.spec.tokenizer, offset)
        return {"index": prompt_index * self.spec.n + c.index, "text": text,
                "logprobs": logprobs, "finish_reason": finish_reason}

    def completion_body(self, choices: list[dict], usage_: dict | None = None,
                        final: bool = True) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices}
        # The completion schema has no null usage, so only the last chunk carries it.
        if final:
            body["usage"] = usage_
        return body

    def _completion_response(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        echo = self.spec.echo
        for p, out in enumerate(outputs):
            prefix = echo[p] if echo else ""
            prompt = out if echo and self.spec.echo_logprobs else None
            for c in out.outputs:
                offset = 0 if prompt is not None else len(prefix)
                choice = self.completion_choice(p, c, prefix + c.text, 0, offset,
                                                c.finish_reason, prompt)
                if self.spec.prompt_logprobs:
                    choice["prompt_logprobs"] = self._prompt_logprobs(out)
                choices.append(choice)
        return self.completion_body(choices, usage(outputs))


def _with_prompt(out: RequestOutput, ids: list[int], entries: list) -> tuple[list, list]:
    """Prompt tokens (their logprobs; the first has none) ahead of the completion's."""
    prompt_ids = list(out.prompt_token_ids)
    prompt_entries = list(getattr(out, "prompt_logprobs", None) or [])
    prompt_entries = [e or {} for e in prompt_entries] + [{}] * (
        len(prompt_ids) - len(prompt_entries))
    return prompt_ids + list(ids), prompt_entries + list(entries)


class ChunkWriter:
    """Turns a request's stream of engine outputs into OpenAI stream chunks (dicts).

    `start()` once, `feed(prompt_index, output)` per engine output, `finish()` at the end;
    each returns the chunks to send. An aborted request raises RequestAborted.
    """

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.spec = reply.spec
        self.tracker = DeltaTracker()
        self.shapes: dict[tuple[int, int], TextShape] = {}
        self.called: set[tuple[int, int]] = set()  # choices that produced tool calls
        self.last: dict[int, RequestOutput] = {}
        self.num_prompts = 1

    def start(self, num_prompts: int = 1) -> list[dict]:
        self.num_prompts = num_prompts
        n, r = self.spec.n, self.reply
        if self.spec.chat:
            return [r.chat_chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]) for i in range(n)]
        if self.spec.echo_logprobs:
            return []  # the echo goes out with the prompt's logprobs, once they arrive
        return [r.completion_body([{"index": p * n + i, "text": text, "logprobs": None,
                                    "finish_reason": None}], final=False)
                for p, text in enumerate(self.spec.echo or ()) for i in range(n)]

    def _echo_with_logprobs(self, p: int, out: RequestOutput) -> list[dict]:
        """The echoed prompt of `p` with its logprobs (first output of that prompt)."""
        ids, entries = _with_prompt(out, [], [])
        logprobs = completion_logprobs(ids, entries, self.spec.top_logprobs or 0,
                                       self.spec.tokenizer)
        n = self.spec.n
        return [self.reply.completion_body(
            [{"index": p * n + i, "text": self.spec.echo[p], "logprobs": logprobs,
              "finish_reason": None}], final=False) for i in range(n)]

    def feed(self, p: int, out: RequestOutput) -> list[dict]:
        chunks: list[dict] = []
        if p not in self.last and self.spec.echo and self.spec.echo_logprobs:
            chunks += self._echo_with_logprobs(p, out)
        self.last[p] = out
        for c in out.outputs:
            delta = self.tracker.delta((p, c.index), c)
            if delta is None:
                continue
            if self.spec.chat:
                chunks += self._chat_chunks((p, c.index), c, delta)
            else:
                chunks += self._completion_chunks(p, c, delta)
        return chunks

    def finish(self) -> list[dict]:
        keys = [(p, i) for p in range(self.num_prompts) for i in range(self.spec.n)]
        if len(self.last) < self.num_prompts or not self.tracker.finished(keys):
            raise RequestAborted()
        if not self.reply.include_usage:
            return []
        final = usage([self.last[p] for p in range(self.num_prompts)])
        if self.spec.chat:
            return [self.reply.chat_chunk([], final)]
        return [self.reply.completion_body([], final)]

    def _chat_chunks(self, key: tuple[int, int], c: CompletionOutput, delta: Delta) -> list[dict]:
        shape = self.shapes.get(key) or self.shapes.setdefault(key, self.spec.shape())
        parts = shape.feed(delta.text) if delta.text else []
        if delta.finish_reason is not None:
            parts += shape.finish()
        logprobs = None
        if self.spec.top_logprobs is not None and delta.logprobs:
            logprobs = self.reply.chat_logprobs(delta.token_ids, delta.logprobs)
            if not parts:
                parts = [{"content": ""}]
        chunks = []
        for part in parts:
            if "tool_calls" in part:
                self.called.add(key)
            chunks.append(self.reply.chat_chunk([{"index": c.index, "delta": part,
                                                  "logprobs": logprobs,
                                                  "finish_reason": None}]))
            logprobs = None
        if delta.finish_reason is not None:
            finish = delta.finish_reason
            if key in self.called and finish == "stop":
                finish = "tool_calls"
            chunks.append(self.reply.chat_chunk([{"index": c.index, "delta": {},
                                                  "logprobs": None, "finish_reason": finish}]))
        return chunks

    def _completion_chunks(self, p: int, c: CompletionOutput, delta: Delta) -> list[dict]:
        r = self.reply
        chunks = []
        has_logprobs = self.spec.top_logprobs is not None and bool(delta.logprobs)
        if delta.text or has_logprobs:
            choice = r.completion_choice(p, c, delta.text, delta.first_token, delta.first_char,
                                         None)
            chunks.append(r.completion_body([choice], final=False))
        if delta.finish_reason is not None:
            chunks.append(r.completion_body([{"index": p * self.spec.n + c.index, "text": "",
                                              "logprobs": None,
                                              "finish_reason": delta.finish_reason}],
                                            final=False))
        return chunks
