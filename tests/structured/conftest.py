"""A tiny random checkpoint and engine helpers shared by the structured-output tests."""

from __future__ import annotations

import pytest
import torch

from llmserve.engine.llm_engine import LLMEngine
from llmserve.models.random_checkpoint import build_random_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return str(build_random_checkpoint(tmp_path_factory.mktemp("ckpt-structured"), "llama"))


def _run_to_completion(engine: LLMEngine) -> dict:
    done = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    raise AssertionError("the engine did not finish its requests")


@pytest.fixture
def run():
    """run(engine): step until idle; the final RequestOutput of every request, by id."""
    return _run_to_completion
