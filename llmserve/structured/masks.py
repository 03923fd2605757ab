"""Grammar bitmasks of one step, filled on the host for the rows that are constrained."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmserve.engine.request import Request

# One thread: masks of a step are filled while the model runs (llguidance drops the GIL).
_FILLER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-masks")


@dataclass
class GrammarMasks:
    """`bitmask[j]` (int32 words, model vocab wide) is the allowed set of row `rows[j]`."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), words] int32, on the host


def grammar_masks(requests: list[Request], device: torch.device | None = None
                  ) -> GrammarMasks | None:
    """The masks of the constrained rows of a step's sampling requests, or None.

    Each matcher must already have seen every output token of its request: a mask built
    from an older state would let the grammar be broken, so that raises instead.
    """
    rows = [i for i, r in enumerate(requests) if r.grammar is not None and r.grammar.active]
    if not rows:
        return None
    backend = requests[rows[0]].grammar.backend
    pin = device is not None and device.type == "cuda"
    bitmask = torch.empty((len(rows), backend.bitmask_words), dtype=torch.int32, pin_memory=pin)
    pairs = []
    for j, i in enumerate(rows):
        request = requests[i]
        grammar = request.grammar
        # A terminated grammar allows only EOS whatever follows, so it need not wait.
        stale = grammar.num_seen != request.num_output_tokens or request.num_output_placeholders > 1
        if stale and not grammar.terminated:
            raise RuntimeError(f"{request}: its grammar has not seen every output token; "
                               "a constrained step must not overlap the previous one")
        pairs.append((grammar.matcher, j))
    backend.fill_bitmasks(pairs, bitmask)
    return GrammarMasks(rows, bitmask)


def start_grammar_masks(requests: list[Request], device: torch.device | None = None
                        ) -> Future[GrammarMasks | None] | None:
    """`grammar_masks` on a worker thread, or None when no row is constrained.

    Called before the forward pass: nothing else touches the matchers until the step's
    tokens are appended, so the masks are filled while the model (and, on a GPU, the
    device) computes the logits.
    """
    if not any(r.grammar is not None and r.grammar.active for r in requests):
        return None
    return _FILLER.submit(grammar_masks, requests, device)
