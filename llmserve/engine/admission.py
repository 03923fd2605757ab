"""Admission checks of a new request: its prompt, its lengths and the token ids it names.

Each raises ValueError with a message a user can act on; the HTTP layer turns it into a 400.
"""

from __future__ import annotations

from llmserve.engine.kv_cache_manager import KVCacheManager
from llmserve.sampling_params import SamplingParams
from llmserve.tokenizer import Tokenizer

# A prompt: text, token ids, or {"prompt": text} / {"prompt_token_ids": ids[, "prompt": text]}.
PromptType = str | list[int] | dict


def check_token_ids(params: SamplingParams, vocab: int) -> None:
    """Token ids in logit_bias and after_token_ids must be in the model's vocabulary."""
    for token_id in params.logit_bias or {}:
        if token_id >= vocab:
            raise ValueError(
                f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab})")
    so = params.structured_outputs
    for token_id in (so.after_token_ids or ()) if so is not None else ():
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab:
            raise ValueError(f"structured_outputs.after_token_ids: token id {token_id!r} is "
                             f"outside the vocabulary [0, {vocab})")


def tokenize_prompt(prompt: PromptType, tokenizer: Tokenizer,
                    vocab: int) -> tuple[str | None, list[int]]:
    """(prompt text or None, prompt token ids) of a string, a token-id list or a prompt dict."""
    text = None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            # With both keys the caller tokenized the text (a server does it off the engine's
            # process); the text is kept for the output, the ids are checked as usual.
            text = prompt.get("prompt")
            if text is not None and (not isinstance(text, str) or not text):
                raise ValueError("prompt must not be empty")
            prompt = prompt["prompt_token_ids"]
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        return prompt, tokenizer.encode(prompt)
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ValueError(f"prompt token id {t!r} is outside the vocabulary [0, {vocab})")
    return text, list(prompt)


def check_lengths(num_prompt: int, params: SamplingParams, limit: int, kv: KVCacheManager,
                  max_num_batched_tokens: int) -> int:
    """The request's max_tokens, after checking that it fits the context and the KV pool."""
    if params.max_tokens is None and num_prompt >= limit:
        raise ValueError(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{num_prompt} tokens, which leaves no room for a completion. Please shorten the prompt."
        )
    max_tokens = params.max_tokens if params.max_tokens is not None else limit - num_prompt
    if num_prompt + max_tokens > limit:
        raise ValueError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for "
            "the completion). Please reduce the length of the prompt or the completion."
        )
    needed = kv.peak_blocks(num_prompt + max_tokens, max_num_batched_tokens)
    if needed > kv.num_blocks:
        raise ValueError(
            f"request needs {needed} KV-cache blocks but the whole pool has {kv.num_blocks}; "
            "reduce the prompt or max_tokens, or give the engine more KV-cache memory"
        )
    return max_tokens
