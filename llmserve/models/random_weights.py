"""Configs and random weights for the tiny checkpoints, built with transformers' own classes."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
# Mixture-of-experts shapes at toy size: more experts than top-k (so some get no token), the
# expert width apart from the dense width (Qwen3-MoE keeps both), Qwen3's head_dim.
MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                    sliding_window=None),
}
DTYPES = ("float32", "float16", "bfloat16")


def model_config(architecture: str, vocab_size: int, eos: list[int], overrides: dict[str, Any]):
    """Build the transformers config with tiny defaults, then the caller's overrides."""
    import transformers

    config_cls = getattr(transformers, ARCHITECTURES[architecture][0])
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # Large enough that random logits differ a lot between tokens, so greedy output varies.
        initializer_range=0.15,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos[0],
    )
    if architecture == "qwen3":
        # Qwen3 sets head_dim apart from hidden/heads; make it differ so loaders cannot assume.
        kwargs["head_dim"] = 32
    kwargs.update(MOE_DEFAULTS.get(architecture, {}))
    kwargs.update(overrides)
    try:
        return config_cls(**kwargs)
    except Exception as exc:  # strict configs raise their own (non-ValueError) validation errors
        raise ValueError(f"invalid {architecture} config override: {exc}") from exc


def randomize_weights(model: Any, seed: int, std: float) -> None:
    """Fill every parameter from a generator seeded by (seed, parameter name).

    The weights then depend on neither transformers' init order nor its version. Norm weights
    are 1 + noise and biases are noise (not 1 and 0), so a loader that drops them is caught by a
    comparison with transformers.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(std * noise)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' shard-writing progress bar for the duration of a save."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
