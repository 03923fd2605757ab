"""The native driver's row-parallel prefill parts (`DecodeForward.qkv`, `.post_attention`): each
thread runs a layer's chain of ops before and after attention on chunks of rows. Pinned: bit for
bit the Python walk's hidden states at any chunk size, the walk's errors, and the fall back to
the walk where the driver does not apply."""

from __future__ import annotations

import pytest
import torch

from llmserve import LLM
from llmserve.kernels import cpu_decode_forward, cpu_native, cpu_packed_gemm
from llmserve.kernels.cpu_decode_forward import DecodeForward
from llmserve.models import cpu_fast_path
from tests.engine.test_cpu_decode_driver import compare_with_walk, fused, generate
from tests.engine.test_parity_transformers import make_prompts

pytestmark = pytest.mark.skipif(
    cpu_native.find_compiler() is None or not cpu_packed_gemm.available(),
    reason="needs a C compiler and torch with MKL")

ARCHS = {
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k norm
    "qwen2": ("qwen2", {}),  # q/k/v bias, a sliding window on layers 1-2
}


@pytest.fixture(autouse=True)
def fresh_load():
    cpu_decode_forward.load.cache_clear()
    yield
    cpu_decode_forward.load.cache_clear()


@pytest.fixture
def chunk_sizes(monkeypatch):
    """Chunk sizes of the driver's row calls, as (rows, chunk)."""
    seen: list[tuple[int, int]] = []
    call = DecodeForward.post_attention

    def counting(self, layer, attn, residual, chunk):
        seen.append((len(residual), chunk))
        return call(self, layer, attn, residual, chunk)

    monkeypatch.setattr(DecodeForward, "post_attention", counting)
    return seen


@pytest.mark.parametrize("chunk", [1, 3, 16, 128])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_row_chunks_give_the_python_walks_hidden_states_bit_for_bit(
        checkpoint_factory, monkeypatch, chunk_sizes, arch, chunk):
    """Every prefill and mixed step is run again through the Python walk (storing the same k
    and v twice changes nothing): equal hidden states, with chunks of 1 row, of fewer rows than
    MKL's packed-copy threshold, of several chunks per thread and a ragged last one."""
    monkeypatch.setattr(cpu_fast_path, "CHUNK_ROWS", chunk)
    checked = compare_with_walk(monkeypatch, chunk_sizes, arch)
    name, overrides = ARCHS[arch]
    llm = LLM(checkpoint_factory(name, **overrides), dtype="float32", max_num_batched_tokens=256)
    batch = make_prompts(vocab=400)
    generate(llm, batch)
    assert len(checked) >= 3 and max(checked) > 200  # several prefill and mixed steps
    assert {c for _, c in chunk_sizes} <= {chunk, *range(1, chunk)}
    if chunk <= 16:  # several chunks per thread (and with 3, a last one cut short)
        assert any(rows > chunk * torch.get_num_threads() for rows, _ in chunk_sizes)


def test_chunk_rows_gives_every_thread_a_chunk(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cpu_fast_path.chunk_rows(8192) == cpu_fast_path.CHUNK_ROWS
    assert cpu_fast_path.chunk_rows(200) == 100
    assert cpu_fast_path.chunk_rows(9) == 5
    assert cpu_fast_path.chunk_rows(3) == 3  # under MIN_ROWS: one plain GEMM, as the walk's
    assert cpu_fast_path.chunk_rows(1) == 1


def _driver(checkpoint_factory) -> tuple[LLM, DecodeForward]:
    llm = LLM(checkpoint_factory("qwen3", head_dim=32), dtype="float32")
    generate(llm, [[5, 6, 7]], max_tokens=1)  # the driver is built at the first step
    driver = fused(llm)._driver_for_cache()
    assert driver is not None
    return llm, driver


def test_bad_positions_and_shapes_raise_and_the_engine_goes_on(checkpoint_factory):
    llm, driver = _driver(checkpoint_factory)
    hidden, rows = driver.hidden, 10
    residual = torch.randn(rows, hidden)
    positions = torch.arange(rows, dtype=torch.int64)
    positions[7] = 10**9  # beyond the rotary cache
    with pytest.raises(IndexError, match="rotary cache"):
        driver.qkv(0, None, residual, positions, 4)
    with pytest.raises(ValueError, match="int64"):
        driver.qkv(0, None, residual, positions.int(), 4)
    with pytest.raises(ValueError, match="contiguous float32 rows"):
        driver.qkv(0, torch.randn(rows + 1, hidden), residual, torch.arange(rows), 4)
    with pytest.raises(ValueError, match="contiguous float32 rows"):
        driver.post_attention(0, torch.randn(rows, driver.q_size).t().contiguous().t(), residual, 4)
    assert generate(llm, [[5, 6, 7]], max_tokens=2)


def test_without_the_driver_or_packed_copies_the_layers_are_walked_with_the_same_tokens(
        checkpoint_factory, monkeypatch, chunk_sizes):
    """Without packed copies (MKL's plain GEMM sums differently for a chunk than for all the
    rows) and with the driver switched off, prefills keep the Python walk."""
    path = checkpoint_factory("qwen3", head_dim=32)
    batch = make_prompts(vocab=400)[:8]
    expected = generate(LLM(path, dtype="float32"), batch)
    assert chunk_sizes
    chunk_sizes.clear()
    monkeypatch.setenv(cpu_packed_gemm.BUDGET_ENV, "0")
    unpacked = LLM(path, dtype="float32")
    assert fused(unpacked)._driver_fns is not None
    assert generate(unpacked, batch) == expected
    assert not chunk_sizes
    monkeypatch.delenv(cpu_packed_gemm.BUDGET_ENV)
    monkeypatch.setenv(cpu_decode_forward.ENV_SWITCH, "0")
    cpu_decode_forward.load.cache_clear()
    assert generate(LLM(path, dtype="float32"), batch) == expected
    assert not chunk_sizes
