"""A sliding-window model (Mistral, window 12) gives the same greedy tokens with the Triton
attention backend as with the torch backend, with blocks released behind the window."""

from __future__ import annotations

import pytest

from llmserve.attention import triton_backend as triton_backend_module
from llmserve.models.random_checkpoint import build_random_window_checkpoint
from tests.kernels.test_engine_triton import _generate


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> str:
    return str(build_random_window_checkpoint(tmp_path_factory.mktemp("mistral-window"),
                                              "mistral", sliding_window=12))


def test_windowed_greedy_tokens_match_torch_backend(mistral_dir, monkeypatch):
    seen: set[tuple[int, int | None]] = set()
    original = triton_backend_module.triton_attention

    def recording(q, k, v, k_cache, v_cache, meta, scale, window=None):
        seen.add((min(meta.max_query_len, 2), window))
        return original(q, k, v, k_cache, v_cache, meta, scale, window)

    want = _generate(mistral_dir, "torch")
    monkeypatch.setattr(triton_backend_module, "triton_attention", recording)
    got = _generate(mistral_dir, "triton")
    assert got == want
    # Both kernels ran with the window: steps with several query rows and pure-decode steps.
    assert seen == {(1, 12), (2, 12)}
