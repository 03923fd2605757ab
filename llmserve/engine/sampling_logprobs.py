"""Logprobs of the raw model logits: computed on the device, unpacked on the host."""

from __future__ import annotations

import torch

from llmserve.engine.sampling_tensors import to_device
from llmserve.outputs import Logprob


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
