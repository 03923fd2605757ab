"""Tiny random checkpoints shared by the engine tests (built once per session)."""

from __future__ import annotations

import json

import pytest
import torch

from llmserve.models.random_checkpoint import build_random_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    cache: dict[tuple, str] = {}

    def build(architecture: str = "llama", **overrides) -> str:
        key = (architecture, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{architecture}")
            cache[key] = str(build_random_checkpoint(path, architecture, **overrides))
        return cache[key]

    return build


@pytest.fixture(scope="session")
def llama_dir(checkpoint_factory) -> str:
    return checkpoint_factory("llama")
