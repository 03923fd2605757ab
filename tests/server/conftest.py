"""Fixtures of the server tests: a tiny random checkpoint and a live server on loopback."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from live_server import LiveServer, live_server


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    from llmserve.models.random_checkpoint import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama",
                                   tokenizer="bpe")


@pytest.fixture(scope="session")
def server(checkpoint) -> Iterator[LiveServer]:
    # The engine in its own process, as `llmserve serve` runs it by default.
    with live_server(checkpoint, engine_process=True) as live:
        yield live
