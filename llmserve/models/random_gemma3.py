"""A tiny random Gemma 3 text checkpoint: Gemma's tokenizer specials and chat template."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from llmserve.models.random_tokenizer import bpe_json, tokenizer_size
from llmserve.models.random_weights import (
    DTYPES,
    model_config,
    quiet_progress_bars,
    randomize_weights,
)

# Gemma's special tokens and chat format: turns are "<start_of_turn>{user|model}\n...<end_of_turn>\n",
# a system message is folded into the first user turn, and roles must alternate (as in the
# template Google ships; string content only here, list content is flattened by llmserve).
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


def _write_gemma_tokenizer(path: pathlib.Path) -> dict[str, int]:
    """The built-in BPE plus Gemma's specials (appended after its ids); return their ids."""
    spec = json.loads(bpe_json())
    ids = {}
    for text in GEMMA_SPECIALS:
        ids[text] = tokenizer_size(spec)
        spec["model"]["vocab"][text] = ids[text]
        spec["added_tokens"].append({"id": ids[text], "content": text, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False,
                                     "special": True})
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": None,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": GEMMA_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {**ids, "size": tokenizer_size(spec)}


def build_random_gemma3_checkpoint(
    path: str | os.PathLike[str], *, seed: int = 0, dtype: str = "float32", **config_overrides: Any
) -> pathlib.Path:
    """A tiny random Gemma 3 text checkpoint (`Gemma3ForCausalLM`) with a Gemma chat template.

    Built with transformers' own `Gemma3TextConfig`: 4 layers alternating local/global
    (``sliding_window_pattern=2``), head_dim 32 (not hidden/heads), ``query_pre_attn_scalar``
    24 (not head_dim), tied embeddings, the default local/global rope bases. ``<eos>`` and
    ``<end_of_turn>`` both end generation (generation_config.json). Overrides as in
    `build_random_checkpoint`, e.g. ``sliding_window=8``, ``final_logit_softcapping=30.0``.
    """
    import torch
    import transformers

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    special = _write_gemma_tokenizer(out)
    eos = [special["<eos>"], special["<end_of_turn>"]]
    overrides = dict(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24,
                     sliding_window=4096, sliding_window_pattern=2, tie_word_embeddings=True,
                     bos_token_id=special["<bos>"], pad_token_id=special["<pad>"])
    overrides.update(config_overrides)
    config = model_config("gemma3", -(-special["size"] // 128) * 128, eos, overrides)
    with torch.random.fork_rng(devices=[]):
        model = transformers.Gemma3ForCausalLM(config)
    randomize_weights(model, seed, config.initializer_range)
    model = model.to(getattr(torch, dtype)).eval()
    with quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    gen = transformers.GenerationConfig(eos_token_id=eos, pad_token_id=special["<pad>"],
                                        bos_token_id=special["<bos>"])
    gen.save_pretrained(out)
    return out
