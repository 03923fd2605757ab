"""Per-row sampling parameters gathered from the requests into device tensors and host flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmserve.engine.request import Request

_F32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


@dataclass
class SamplingTensors:
    """Per-row parameters as device tensors (built in one construction) plus host-side flags.

    Everything a later stage needs from the requests is copied here, so nothing reads the
    requests' (growing) token lists after the sampler returns.
    """

    temperature: torch.Tensor  # [B]; 1.0 on greedy rows so the division is harmless
    top_k: torch.Tensor  # [B] long; 0 = off
    top_p: torch.Tensor  # [B]
    min_p: torch.Tensor  # [B]
    presence: torch.Tensor  # [B]
    frequency: torch.Tensor  # [B]
    repetition: torch.Tensor  # [B]
    random_rows: list[int]
    rep_rows: list[int]  # rows with repetition_penalty != 1
    pf_rows: list[int]  # rows with a presence or frequency penalty
    blocked: tuple[list[int], list[int]]  # (row, token id) pairs that min_tokens forbids
    logprob_rows: list[int]
    logprob_ks: list[int]  # top-k logprobs asked, per entry of logprob_rows
    seeded: list[tuple[int, Request]]  # (row, request) of random rows that carry a seed
    max_top_k: int  # largest enabled top_k among random rows (0 if none)
    use_top_p: bool
    use_min_p: bool

    @classmethod
    def from_requests(
        cls, requests: list[Request], vocab: int, device: torch.device
    ) -> SamplingTensors:
        """Gather every row's SamplingParams; one host-to-device copy for all of them."""
        values: list[float] = []
        random_rows: list[int] = []
        rep_rows: list[int] = []
        pf_rows: list[int] = []
        logprob_rows: list[int] = []
        logprob_ks: list[int] = []
        seeded: list[tuple[int, Request]] = []
        max_top_k, use_top_p, use_min_p = 0, False, False
        for i, r in enumerate(requests):
            sp = r.sampling_params
            top_k = min(sp.top_k, vocab)
            # top_k == 1 is greedy by definition; taking argmax also makes ties resolve the same.
            greedy = sp.greedy or sp.top_k == 1
            if not greedy:
                random_rows.append(i)
                max_top_k = max(max_top_k, top_k)
                use_top_p = use_top_p or sp.top_p < 1.0
                use_min_p = use_min_p or sp.min_p > 0.0
                if r.generator is not None:
                    seeded.append((i, r))
            if sp.repetition_penalty != 1.0:
                rep_rows.append(i)
            if sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0:
                pf_rows.append(i)
            if sp.logprobs is not None:
                logprob_rows.append(i)
                logprob_ks.append(sp.logprobs)
            # top_p and repetition_penalty are any positive float: one below float32's range
            # must not become 0 here (top-p would keep no token, the penalty divide by zero).
            values += (1.0 if greedy else sp.temperature, top_k, max(sp.top_p, _F32_TINY),
                       sp.min_p, sp.presence_penalty, sp.frequency_penalty,
                       max(sp.repetition_penalty, _F32_TINY))  # fmt: skip
        t = to_device(values, torch.float32, device).reshape(len(requests), 7).T
        return cls(
            temperature=t[0], top_k=t[1].long(), top_p=t[2], min_p=t[3],
            presence=t[4], frequency=t[5], repetition=t[6],
            random_rows=random_rows, rep_rows=rep_rows, pf_rows=pf_rows,
            blocked=min_tokens_blocked(requests, vocab),
            logprob_rows=logprob_rows, logprob_ks=logprob_ks, seeded=seeded,
            max_top_k=max_top_k, use_top_p=use_top_p, use_min_p=use_min_p,
        )  # fmt: skip

    @property
    def needs_penalties(self) -> bool:
        return bool(self.rep_rows or self.pf_rows or self.blocked[0])


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> tensor on `device` without waiting for queued GPU work (pinned, async copy)."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def stop_ids_to_block(request: Request) -> set[int]:
    """The stop tokens min_tokens forbids while it is not reached.

    Like vLLM, eos ids are not blocked when ignore_eos is set (they do not stop the request then).
    """
    sp = request.sampling_params
    stops = set(sp.stop_token_ids or ())
    if not sp.ignore_eos:
        stops |= set(request.eos_token_ids)
    return stops


def min_tokens_blocked(requests: list[Request], vocab: int) -> tuple[list[int], list[int]]:
    """(rows, ids) of the stop tokens that may not be sampled yet because of min_tokens.

    Constrained rows are left out: blocking the EOS a finished grammar allows alone would leave
    nothing to sample."""
    rows: list[int] = []
    ids: list[int] = []
    for i, r in enumerate(requests):
        if len(r.output_token_ids) >= r.sampling_params.min_tokens:
            continue
        if r.grammar is not None and r.grammar.active:
            continue  # the grammar decides where the text ends: it may need EOS now
        kept = [t for t in sorted(stop_ids_to_block(r)) if 0 <= t < vocab]
        rows += [i] * len(kept)
        ids += kept
    return rows, ids
