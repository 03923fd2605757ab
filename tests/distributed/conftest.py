"""Tiny random checkpoints for the tensor-parallel tests (built once per session)."""

from __future__ import annotations

import json

import pytest
import torch

from llmserve.models.random_checkpoint import build_random_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))

# (architecture, overrides): Llama shards its 2 KV heads over 2 ranks; Qwen3 has one KV head,
# replicated on both, tied embeddings, and a vocabulary (515) that does not split evenly.
CHECKPOINTS = {
    "llama-kv2": ("llama", {"num_key_value_heads": 2}),
    "qwen3-kv1-tied": ("qwen3", {"num_key_value_heads": 1, "tie_word_embeddings": True, "vocab_size": 515}),
}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    cache: dict[str, str] = {}

    def build(name: str) -> str:
        if name not in cache:
            arch, overrides = CHECKPOINTS[name]
            path = tmp_path_factory.mktemp(f"tp-{name}")
            cache[name] = str(build_random_checkpoint(path, arch, **overrides))
            json.loads((path / "config.json").read_text())  # fail early on a broken build
        return cache[name]

    return build
