"""RequestOutputs across a process boundary: only what changed since the last message.

Outputs are cumulative (the whole text and token ids so far), so sending them as they are would
cost O(length) per token. The engine-core process encodes each output as a delta against what it
already sent for that request, and the frontend rebuilds the cumulative `RequestOutput`, so every
consumer sees exactly what an in-process engine would have given it.

Text, token ids and logprobs are sent as `(keep, tail)`: keep the first `keep` items of what the
frontend holds and append `tail`. They only ever grow while a request runs, so `keep` is
normally everything sent so far; the encoder still checks, and resends the whole value if an
engine ever rewrote the past. The prompt goes once, with a request's first message; the metrics
go as a plain tuple of timestamps, which pickles several times faster than the dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from llmserve.engine.output_processor import new_text
from llmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from llmserve.tokenizer import IncrementalDetokenizer, Tokenizer


class WireCompletion(NamedTuple):
    """The layout of one completion's delta. It travels as a plain tuple of these fields, in this
    order (`WireCompletion._make(t)` gives the named view): NamedTuple instances pickle several
    times slower than tuples, and the step message carries one per running sequence."""

    index: int
    text_keep: int  # keep this many characters of the text held for it ...
    text_tail: str  # ... and append these
    token_keep: int
    token_tail: list[int]
    logprobs_keep: int
    logprobs_tail: list | None  # None: the request asked for no logprobs
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None
    error: str | None  # CompletionOutput.error


class WireOutput(NamedTuple):
    """The layout of one RequestOutput's delta; a plain tuple on the wire, like WireCompletion."""

    request_id: str
    prompt: tuple[str | None, list[int]] | None  # (prompt, prompt_token_ids), first message only
    finished: bool
    num_cached_tokens: int
    metrics: tuple | None  # RequestMetrics' fields in order
    num_computed_prefill_tokens: int
    num_computed_decode_tokens: int
    extra: dict
    completions: list[tuple]  # WireCompletion layouts
    # RequestOutput.prompt_logprobs, in the first message that has them only (None otherwise).
    prompt_logprobs: list | None = None


def _metrics_tuple(m: RequestMetrics | None) -> tuple | None:
    if m is None:
        return None
    return (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
            m.finished_time)


@dataclass
class _Sent:
    text: str = ""
    num_tokens: int = 0
    num_logprobs: int = 0


class OutputEncoder:
    """Engine side: `encode(outputs)` gives the wire form; forgets a request once it finished."""

    def __init__(self) -> None:
        self._sent: dict[str, dict[int, _Sent]] = {}
        self._sent_prompt_logprobs: set[str] = set()

    def encode(self, outputs: list[RequestOutput]) -> list[tuple]:
        """Plain tuples laid out as `WireOutput`, one per output."""
        return [self._encode(out) for out in outputs]

    def _encode(self, out: RequestOutput) -> tuple:
        sent = self._sent.get(out.request_id)
        first = sent is None
        if sent is None:
            sent = self._sent[out.request_id] = {}
        completions = []
        for c in out.outputs:
            s = sent.setdefault(c.index, _Sent())
            text_keep = len(s.text) if c.text.startswith(s.text) else 0
            tok_keep = s.num_tokens if len(c.token_ids) >= s.num_tokens else 0
            lp_keep, lp_tail = 0, None
            if c.logprobs is not None:
                lp_keep = s.num_logprobs if len(c.logprobs) >= s.num_logprobs else 0
                lp_tail = c.logprobs[lp_keep:]
                s.num_logprobs = len(c.logprobs)
            completions.append((  # a WireCompletion's fields
                c.index, text_keep, c.text[text_keep:], tok_keep, c.token_ids[tok_keep:],
                lp_keep, lp_tail, c.cumulative_logprob, c.finish_reason, c.stop_reason, c.error,
            ))
            s.text, s.num_tokens = c.text, len(c.token_ids)
        prompt_logprobs = None
        if out.prompt_logprobs is not None and out.request_id not in self._sent_prompt_logprobs:
            prompt_logprobs = out.prompt_logprobs
            self._sent_prompt_logprobs.add(out.request_id)
        if out.finished:
            del self._sent[out.request_id]
            self._sent_prompt_logprobs.discard(out.request_id)
        return (  # a WireOutput's fields
            out.request_id, (out.prompt, out.prompt_token_ids) if first else None, out.finished,
            out.num_cached_tokens, _metrics_tuple(out.metrics), out.num_computed_prefill_tokens,
            out.num_computed_decode_tokens, out.extra, completions, prompt_logprobs,
        )


@dataclass
class _TextSpec:
    """How to detokenize a request whose text the core does not send."""

    tokenizer: Tokenizer
    prompt_token_ids: list[int]
    skip_special_tokens: bool


@dataclass
class _Held:
    prompt: str | None
    prompt_token_ids: list[int]
    completions: dict[int, CompletionOutput] = field(default_factory=dict)
    text: _TextSpec | None = None
    detoks: dict[int, IncrementalDetokenizer] = field(default_factory=dict)
    prompt_logprobs: list | None = None


class OutputDecoder:
    """Frontend side: `decode(wire)` rebuilds fresh cumulative RequestOutputs (never mutated
    afterwards, so consumers may keep them)."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._text_specs: dict[str, _TextSpec] = {}

    def __len__(self) -> int:
        return len(self._held)

    def detokenize(self, request_id: str, prompt_token_ids: list[int], tokenizer: Tokenizer,
                   skip_special_tokens: bool) -> None:
        """Build `request_id`'s text here from its tokens (the core sends none for requests
        without stop strings), exactly as the core's OutputProcessor would. Call it before the
        request's first output is decoded."""
        self._text_specs[request_id] = _TextSpec(tokenizer, prompt_token_ids, skip_special_tokens)

    def decode(self, wire: list[tuple]) -> list[RequestOutput]:
        """RequestOutputs from `OutputEncoder.encode`'s tuples (after the pipe)."""
        return [self._decode(w) for w in wire]

    def _decode(self, w: tuple) -> RequestOutput:
        (request_id, prompt, finished, cached, metrics, prefill, decode, extra, completions,
         prompt_logprobs) = w
        held = self._held.get(request_id)
        if held is None:
            held = self._held[request_id] = _Held(*prompt) if prompt else _Held(None, [])
            held.text = self._text_specs.pop(request_id, None)
        if prompt_logprobs is not None:
            held.prompt_logprobs = prompt_logprobs
        outputs = []
        for (index, text_keep, text_tail, tok_keep, tok_tail, lp_keep, lp_tail, cumulative,
             finish_reason, stop_reason, error) in completions:
            prev = held.completions.get(index)
            if prev is None:
                text, tokens, logprobs = text_tail, list(tok_tail), (
                    list(lp_tail) if lp_tail is not None else None)
            else:
                text = prev.text[:text_keep] + text_tail
                tokens = prev.token_ids[:tok_keep] + tok_tail
                logprobs = None
                if lp_tail is not None:
                    logprobs = (prev.logprobs or [])[:lp_keep] + lp_tail
            if held.text is not None:
                text = self._text(held, index, prev, tok_keep, tok_tail, finish_reason)
            c = CompletionOutput(index, text, tokens, cumulative, logprobs, finish_reason,
                                 stop_reason, error)
            held.completions[index] = c
            outputs.append(c)
        if finished:
            del self._held[request_id]
        return RequestOutput(
            request_id=request_id, prompt=held.prompt, prompt_token_ids=held.prompt_token_ids,
            outputs=outputs, finished=finished, num_cached_tokens=cached,
            metrics=RequestMetrics(*metrics) if metrics is not None else None,
            num_computed_prefill_tokens=prefill, num_computed_decode_tokens=decode, extra=extra,
            prompt_logprobs=held.prompt_logprobs,
        )

    @staticmethod
    def _text(held: _Held, index: int, prev: CompletionOutput | None, tok_keep: int,
              tok_tail: list[int], finish_reason: str | None) -> str:
        """The completion's text after this message, from its new tokens (see `detokenize`)."""
        detok = held.detoks.get(index)
        if detok is None or prev is None or tok_keep != len(prev.token_ids):
            # The first tokens, or a past the core rewrote: detokenize from the prompt again.
            spec = held.text
            detok = held.detoks[index] = IncrementalDetokenizer(
                spec.tokenizer, spec.prompt_token_ids, spec.skip_special_tokens)
            text, new = "", (prev.token_ids[:tok_keep] if prev else []) + tok_tail
        else:
            text, new = prev.text, tok_tail
        # Without stop strings, "stop" means an EOS or stop token ended the completion.
        return text + new_text(detok, new, stopped_by_token=finish_reason == "stop",
                               finished=finish_reason is not None)

