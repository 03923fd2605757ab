"""min_tokens blocking and repetition / presence / frequency penalties, vectorised over rows.

Token histories are kept per request as numpy copies that grow by the new tokens only, so a
step costs memcpy-speed work per token instead of a Python-to-tensor conversion of every token
of every penalised row.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmserve.engine.sampling_tensors import SamplingTensors, to_device

if TYPE_CHECKING:
    from llmserve.engine.request import Request

_NEG_INF = float("-inf")
_F32 = torch.finfo(torch.float32)


class _Row:
    __slots__ = ("buf", "n")

    def __init__(self, tokens: list[int]) -> None:
        self.buf = np.array(tokens, dtype=np.int64)
        self.n = len(tokens)


class TokenHistory:
    """A private copy of each request's prompt + output ids, refreshed by what was appended.

    Token lists are append-only in the engine; a list that got shorter, or whose last cached
    token changed, is copied again in full, so a rewritten history is never used stale.
    """

    def __init__(self) -> None:
        self._rows: weakref.WeakKeyDictionary[Request, _Row] = weakref.WeakKeyDictionary()

    def all_ids(self, req: Request) -> np.ndarray:
        """Prompt + output ids as int64; a view that later calls never write inside."""
        tokens = req.all_token_ids
        n = len(tokens)
        row = self._rows.get(req)
        if row is None or row.n > n or (row.n and row.buf[row.n - 1] != tokens[row.n - 1]):
            row = self._rows[req] = _Row(tokens)
        elif row.n < n:
            if n > len(row.buf):
                grown = np.empty(max(n, 2 * len(row.buf)), dtype=np.int64)
                grown[: row.n] = row.buf[: row.n]
                row.buf = grown
            row.buf[row.n : n] = tokens[row.n : n]
            row.n = n
        return row.buf[:n]


def apply_penalties(
    logits: torch.Tensor,
    requests: list[Request],
    st: SamplingTensors | None = None,
    history: TokenHistory | None = None,
) -> torch.Tensor:
    """min_tokens, repetition, presence and frequency penalties; returns a new tensor.

    Repetition (HF/vLLM): over prompt and output tokens, positive logits are divided by the
    penalty and negative ones multiplied. Presence/frequency (OpenAI): over output tokens only,
    logit -= presence * (count > 0) + frequency * count. Only the logits of tokens in a
    penalised row's history are read and written (ids outside the vocabulary are ignored).
    """
    vocab = logits.shape[1]
    device = logits.device
    st = st or SamplingTensors.from_requests(requests, vocab, device)
    out = logits.clone(memory_format=torch.contiguous_format)
    rows, ids = st.blocked
    if rows:
        index = to_device([rows, ids], torch.long, device)
        out[index[0], index[1]] = _NEG_INF
    if not (st.rep_rows or st.pf_rows):
        return out
    history = history or TokenHistory()
    rep, pf = set(st.rep_rows), set(st.pf_rows)
    pen_rows = sorted(rep | pf)
    touched, produced = [], []
    for i in pen_rows:
        ids_i = history.all_ids(requests[i])
        output = ids_i[requests[i].num_prompt_tokens :]
        touched.append(ids_i if i in rep else output)  # where a penalty can apply
        produced.append(output if i in pf else output[:0])  # what presence/frequency count
    # One host-to-device copy for both lists: (row, slot among pen_rows, id) per token.
    slots = list(range(len(pen_rows)))
    index, n_touched = _to_index([touched, produced], pen_rows, slots, vocab, device)
    row, slot, tok = index[:, :n_touched]
    # Flat positions with gather / scatter: no host sync on CUDA, whatever the ids.
    at = row * vocab + tok
    flat = out.view(-1)
    v = flat.gather(0, at)
    # A tiny penalty (never 0: `SamplingTensors` keeps it in float32's range) can still push a
    # quotient past float32's maximum: it stays finite, so the favoured tokens tie there
    # instead of the row turning NaN.
    r = st.repetition.gather(0, row)
    v = torch.where(v > 0, (v / r).clamp_max(_F32.max), v * r)  # a penalty of 1 changes nothing
    if pf:
        _, p_slot, p_tok = index[:, n_touched:]
        counts = torch.zeros(len(pen_rows) * vocab, device=device)
        counts.scatter_add_(0, p_slot * vocab + p_tok, torch.ones_like(p_tok, dtype=counts.dtype))
        c = counts.gather(0, slot * vocab + tok)
        v = v - st.presence.gather(0, row) * (c > 0) - st.frequency.gather(0, row) * c
    flat.scatter_(0, at, v)  # repeated ids write the same value
    return out


def _to_index(
    groups: list[list[np.ndarray]], rows: list[int], slots: list[int], vocab: int,
    device: torch.device,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """[3, n] (row, slot, id) of every in-vocabulary id of `group[j]` (row `rows[j]`, slot
    `slots[j]`), the groups one after the other; and how many ids the first group has."""
    seqs = [s for group in groups for s in group]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.empty((3, int(lengths.sum())), dtype=np.int64)
    flat[0] = np.repeat(np.asarray(rows * len(groups), dtype=np.int64), lengths)
    flat[1] = np.repeat(np.asarray(slots * len(groups), dtype=np.int64), lengths)
    if seqs:
        np.concatenate(seqs, out=flat[2])
    valid = (flat[2] >= 0) & (flat[2] < vocab)
    first = int(valid[: int(lengths[: len(groups[0])].sum())].sum())
    index = torch.from_numpy(np.ascontiguousarray(flat[:, valid]))
    if device.type == "cuda":  # pinned, asynchronous
        index = index.pin_memory().to(device, non_blocking=True)
    return index, first
