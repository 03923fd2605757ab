"""logit_bias and grammar bitmasks, applied to the logits before anything else.

Order: the bias is added first, then the mask, so a token a grammar forbids stays forbidden
whatever its bias. Both touch only the rows that have them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from llmserve.engine.sampling_tensors import to_device

if TYPE_CHECKING:
    from llmserve.engine.request import Request
    from llmserve.structured.masks import GrammarMasks

_NEG_INF = float("-inf")


def has_constraints(requests: list[Request], masks: GrammarMasks | None) -> bool:
    return masks is not None or any(r.sampling_params.logit_bias for r in requests)


def apply_constraints(logits: torch.Tensor, requests: list[Request],
                      masks: GrammarMasks | None) -> None:
    """Add each row's logit_bias and apply its grammar mask, in place."""
    apply_logit_bias(logits, requests)
    if masks is not None:
        apply_token_bitmask(logits, masks.rows, masks.bitmask)


def apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    """One scatter-add for every (row, token id, bias) of the rows that carry a bias. Ids
    outside the logits are ignored (the engine refuses them when the request is added)."""
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    vocab = logits.shape[1]
    for i, r in enumerate(requests):
        bias = r.sampling_params.logit_bias
        if not bias:
            continue
        for token_id, value in bias.items():
            if 0 <= token_id < vocab:
                rows.append(i)
                ids.append(token_id)
                values.append(float(value))
    if not rows:
        return
    index = to_device([rows, ids], torch.long, logits.device)
    logits.index_put_((index[0], index[1]), to_device(values, logits.dtype, logits.device),
                      accumulate=True)


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in `logits[rows[j]]`, every token whose bit in `bitmask[j]` is 0.

    The bits are unpacked where it is cheapest: with numpy on the host for CPU logits, with
    shifts on the device otherwise (only the packed words travel).
    """
    vocab = logits.shape[1]
    banned = _banned(bitmask, logits.device, vocab)
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        logits.masked_fill_(banned, _NEG_INF)
        return
    index = to_device(rows, torch.long, logits.device)
    sub = logits.index_select(0, index).masked_fill_(banned, _NEG_INF)
    logits.index_copy_(0, index, sub)


def _banned(bitmask: torch.Tensor, device: torch.device, vocab: int) -> torch.Tensor:
    """[R, W] int32 words -> [R, vocab] bool, True where the bit is 0 (bit k of word w is
    column 32 w + k; columns past 32 W are banned too)."""
    if device.type == "cpu":
        # Invert the packed words (W int32 per row), not the unpacked mask (vocab bytes).
        bits = np.unpackbits((~bitmask.numpy()).view(np.uint8), axis=1, bitorder="little")
        banned = torch.from_numpy(bits.view(np.bool_))
    else:
        words = bitmask.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        banned = ((words.unsqueeze(-1) >> shifts) & 1).eq(0).reshape(words.shape[0], -1)
    if banned.shape[1] >= vocab:
        return banned[:, :vocab]
    pad = torch.ones(banned.shape[0], vocab - banned.shape[1], dtype=torch.bool,
                     device=banned.device)
    return torch.cat([banned, pad], dim=1)
