"""Logprobs of the raw model logits: computed on the device, unpacked on the host.

Sampled tokens' logprobs come from the rows that sample; prompt logprobs
(`SamplingParams.prompt_logprobs`) from every prompt row of the requests that ask for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmserve.engine.sampling_tensors import to_device
from llmserve.outputs import Logprob

if TYPE_CHECKING:
    from llmserve.engine.request import Request


def logprob_parts(
    raw: torch.Tensor, tokens: torch.Tensor, rows: list[int], ks: list[int]
) -> list[torch.Tensor]:
    """Chosen logprob, its 1-based rank, and the top-k values/ids (k = max asked), flattened."""
    idx = to_device(rows, torch.long, raw.device)
    lp = torch.log_softmax(raw.index_select(0, idx), dim=-1)
    chosen = lp.gather(1, tokens.index_select(0, idx)[:, None])
    rank = (lp > chosen).sum(dim=-1) + 1
    top_v, top_i = lp.topk(max(ks), dim=-1)
    return [
        chosen.squeeze(1).double(),
        rank.double(),
        top_v.double().flatten(),
        top_i.double().flatten(),
    ]


def unpack_logprobs(
    flat: list[float], token_ids: list[int], rows: list[int], ks: list[int]
) -> list[dict[int, Logprob] | None]:
    """Per row: {chosen: Logprob, then the top-k ids: Logprob}, or None where none were asked."""
    out: list[dict[int, Logprob] | None] = [None] * len(token_ids)
    if not rows:
        return out
    n = len(rows)
    k = (len(flat) - 2 * n) // (2 * n)
    chosen, ranks = flat[:n], flat[n : 2 * n]
    top_v, top_i = flat[2 * n : 2 * n + n * k], flat[2 * n + n * k :]
    for j, (i, asked) in enumerate(zip(rows, ks, strict=True)):
        d = {token_ids[i]: Logprob(chosen[j], int(ranks[j]))}
        for r in range(asked):
            d.setdefault(int(top_i[j * k + r]), Logprob(top_v[j * k + r], r + 1))
        out[i] = d
    return out


# Logits rows per chunk when scoring a prompt: 2**25 float32 values (128 MiB) at a time, so a
# long prefill chunk never holds [tokens, vocab] logits at once.
_PROMPT_CHUNK_ELEMENTS = 1 << 25


@dataclass
class PromptLogprobSpan:
    """One request's share of a step's prompt logprobs: positions `first..first+count-1` of
    its prompt (each scored from the logits one position earlier), with top-`k` alternatives."""

    request: Request
    first: int
    count: int
    k: int


def prompt_logprob_targets(
    scheduled: list[tuple[Request, int]], starts: list[int], query_start_loc: np.ndarray,
) -> tuple[list[int], list[int], list[PromptLogprobSpan]]:
    """The flat token rows whose logits score a prompt token, those tokens, and the spans.

    Position `p` of a request's chunk predicts prompt token `p + 1`; positions already scored
    (a recompute after preemption) are not scored again. Cost when nobody asks: one loop over
    the batch (about 8 us at 256 requests on these 2 loaded cores).
    """
    rows: list[int] = []
    targets: list[int] = []
    spans: list[PromptLogprobSpan] = []
    for request, _ in scheduled:  # the usual step: nobody asks (a plain loop is the cheapest)
        if request.prompt_logprobs is not None:
            break
    else:
        return rows, targets, spans
    for i, (request, n) in enumerate(scheduled):
        scored = request.prompt_logprobs
        if scored is None:
            continue
        start, prompt = starts[i], request.prompt_token_ids
        end = min(start + n, len(prompt) - 1)  # the last position predicts an output token
        first = start  # scored positions form a prefix: skip what a recompute already has
        while first < end and scored[first + 1] is not None:
            first += 1
        if first >= end:
            continue
        base = int(query_start_loc[i]) - start
        rows.extend(range(base + first, base + end))
        targets.extend(prompt[first + 1:end + 1])
        spans.append(PromptLogprobSpan(request, first + 1, end - first,
                                       request.sampling_params.prompt_logprobs))
    return rows, targets, spans


class PendingPromptLogprobs:
    """A step's prompt logprobs, computed on the device and copied to the host asynchronously;
    `write()` stores them into the requests' `prompt_logprobs` lists."""

    def __init__(self, hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                 vocab_size: int, rows: list[int], targets: list[int],
                 spans: list[PromptLogprobSpan]) -> None:
        device = hidden.device
        ks = [s.k for s in spans for _ in range(s.count)]
        k = max(ks)
        idx = to_device(rows, torch.long, device)
        tokens = to_device(targets, torch.long, device)
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        chunk = max(1, _PROMPT_CHUNK_ELEMENTS // vocab_size)
        for lo in range(0, len(rows), chunk):
            logits = compute_logits(hidden.index_select(0, idx[lo:lo + chunk]))
            n = logits.shape[0]
            for bucket, part in zip(parts, logprob_parts(logits, tokens[lo:lo + n],
                                                         list(range(n)), [k] * n)):
                bucket.append(part)
        packed = torch.cat([torch.cat(b) for b in parts])
        self._targets, self._ks, self._spans = targets, ks, spans
        self._packed = self._host = packed
        self._event: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def write(self) -> None:
        """Wait for the copy and fill the requests' prompt logprobs (once)."""
        if self._host is None:
            return
        if self._event is not None:
            self._event.synchronize()
        flat = self._host.tolist()
        self._host = self._packed = None
        entries = unpack_logprobs(flat, self._targets, list(range(len(self._targets))), self._ks)
        at = 0
        for span in self._spans:
            scored = span.request.prompt_logprobs
            for j in range(span.count):
                if scored[span.first + j] is None:  # a recompute may score a position twice
                    span.request.num_prompt_logprobs += 1
                    scored[span.first + j] = entries[at + j]
            at += span.count
