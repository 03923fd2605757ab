"""Shared fixtures of the batch tests: one tiny random checkpoint per session."""

from __future__ import annotations

import pytest
import torch

from llmserve.models.random_checkpoint import build_random_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return str(build_random_checkpoint(tmp_path_factory.mktemp("batch-ckpt") / "tiny-llama",
                                       "llama", tokenizer="bpe"))
