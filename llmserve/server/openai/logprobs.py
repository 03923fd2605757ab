"""Engine logprobs (one {token_id: Logprob} dict per token) in OpenAI's two response shapes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmserve.outputs import Logprob, SampleLogprobs

# JSON has no -Infinity; OpenAI-compatible servers clamp impossible tokens to this.
MIN_LOGPROB = -9999.0


def _value(lp: Logprob | None) -> float:
    if lp is None or math.isnan(lp.logprob):
        return MIN_LOGPROB
    return max(float(lp.logprob), MIN_LOGPROB)


def _text(token_id: int, lp: Logprob | None, tokenizer) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode_token(token_id)


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    if k <= 0:
        return []
    return sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]


def chat_logprobs(token_ids: list[int], logprobs: SampleLogprobs, top_k: int,
                  tokenizer) -> dict:
    """`{"content": [...], "refusal": None}` for the given tokens (ChatCompletionTokenLogprob)."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        chosen = entry.get(token_id)
        token = _text(token_id, chosen, tokenizer)
        top = [{"token": _text(tid, lp, tokenizer), "logprob": _value(lp),
                "bytes": list(tokenizer.token_bytes(tid))} for tid, lp in _top(entry, top_k)]
        content.append({"token": token, "logprob": _value(chosen),
                        "bytes": list(tokenizer.token_bytes(token_id)), "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(token_ids: list[int], logprobs: SampleLogprobs, top_k: int,
                        tokenizer, offset: int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset.

    As OpenAI documents, `top_logprobs` always includes the sampled token, so an entry holds up
    to `top_k + 1` tokens.
    """
    tokens, values, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        chosen = entry.get(token_id)
        token = _text(token_id, chosen, tokenizer)
        top = {_text(tid, lp, tokenizer): _value(lp) for tid, lp in _top(entry, top_k)}
        top.setdefault(token, _value(chosen))
        tokens.append(token)
        values.append(_value(chosen))
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def prompt_logprobs(entries: list | None, tokenizer) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or
    `{token_id: {"logprob", "rank", "decoded_token"}}`, token ids as JSON keys."""
    if entries is None:
        return None
    return [None if entry is None else {
        str(tid): {"logprob": _value(lp), "rank": lp.rank,
                   "decoded_token": _text(tid, lp, tokenizer)} for tid, lp in entry.items()}
        for entry in entries]
