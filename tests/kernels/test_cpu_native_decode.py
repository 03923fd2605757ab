"""The native CPU decode kernel (`llmserve.kernels.cpu_native`) against the pure-torch path."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading

import pytest
import torch

from llmserve.attention.backends import torch_attention
from llmserve.attention.metadata import AttentionMetadata
from llmserve.kernels import cpu_native, cpu_prefill, ref

F32 = torch.float32
needs_compiler = pytest.mark.skipif(cpu_native.find_compiler() is None, reason="no C compiler")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu")  # the kernel is CPU-only, even on a machine with a GPU


@pytest.fixture
def native():
    """The loaded kernel; skips when this machine cannot build it."""
    if cpu_native.find_compiler() is None:
        pytest.skip("no C compiler")
    if cpu_native.load() is None:
        # With a compiler at hand a failed build is a bug, not a reason to skip.
        pytest.fail("the native library did not build (see the warning logged by cpu_native)")
    return cpu_native.load()


@pytest.fixture
def fresh_load():
    """`load()` (and the prefill kernels' `load()`, whose chunks a plan may use) re-evaluated
    under the test's environment, and again afterwards."""
    cpu_native.load.cache_clear()
    cpu_prefill.load.cache_clear()
    yield
    cpu_native.load.cache_clear()
    cpu_prefill.load.cache_clear()


def _both(batch, q=None, tables=None):
    """(native, torch) outputs of `paged_attention` on the same inputs."""
    q = batch.q if q is None else q
    tables = batch.block_tables if tables is None else tables
    args = (q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens, tables,
            batch.scale)
    return ref.paged_attention(*args, native=True), ref.paged_attention(*args, native=False)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# (kv_heads, group, head_dim, block_size): group sizes 1/2/4, head_dim 32, 64 and 40 (not a power
# of two), block sizes 8 and 16, and 12 (runs of K rows that end inside a vector). Every (head_dim,
# group) copy of the grouped kernel is here ((32|64|128, 1), (32|64, 2), (32, 4)), and cases it
# does not take ((64, 4), head_dim 40) run the per-head one.
CASES = [
    (2, 1, 32, 16), (2, 2, 32, 16), (1, 4, 64, 8), (2, 2, 40, 8), (4, 4, 40, 16), (2, 1, 64, 16),
    (2, 4, 32, 16), (1, 4, 32, 12), (2, 2, 64, 8), (1, 1, 128, 16),
]


@pytest.mark.parametrize("kv_heads,group,head_dim,block_size", CASES)
def test_decode_matches_torch_across_lengths(native, paged_batch, kv_heads, group, head_dim, block_size):
    lens = [1, block_size - 1, block_size, block_size + 1, 300, 131]
    batch = paged_batch([1] * len(lens), lens, kv_heads, group, head_dim, block_size, F32)
    _close(*_both(batch))


@pytest.mark.parametrize("head_dim", [1, 7, 36, 128, 200])
def test_head_dims_with_scalar_tails_and_several_register_passes(native, paged_batch, head_dim):
    batch = paged_batch([1] * 4, [3, 70, 129, 260], 1, 3, head_dim, 16, F32)
    _close(*_both(batch))


def test_strided_q_view_and_int64_tables(native, paged_batch):
    """q as the model passes it (heads of a wider [T, H + KVH, D] row), int64 block tables."""
    batch = paged_batch([1] * 5, [5, 17, 64, 200, 333], 2, 2, 32, 16, F32)
    wide = torch.randn(5, 6, 32)
    wide[:, :4] = batch.q
    out, want = _both(batch, q=wide[:, :4], tables=batch.block_tables.long())
    _close(out, want)
    _close(out, _both(batch)[1])


@pytest.mark.parametrize("q_lens,seq_lens", [
    ([1, 4, 1, 1, 7], [40, 4, 17, 300, 20]),  # decodes around prefill and extend rows
    ([5, 1, 1], [5, 9, 16]),
    ([3, 2], [3, 34]),  # no decode row at all
])
def test_mixed_steps_match_torch(native, paged_batch, q_lens, seq_lens):
    batch = paged_batch(q_lens, seq_lens, 2, 2, 32, 8, F32)
    plan = ref.plan_paged_attention(batch.query_start_loc, batch.seq_lens, batch.block_tables, 8,
                                    native=True)
    assert (plan.native is not None) == (1 in q_lens)
    assert all(group.pad_index is not None for group in plan.groups)  # decode rows left torch
    _close(*_both(batch))


def test_torch_backend_uses_the_kernel(native, paged_batch):
    # The 3-token row extends a 1-token context, so it reads the cache (a fresh prefill would
    # attend over the new k/v, which this test leaves out of the cache).
    batch = paged_batch([1, 3, 1], [30, 4, 200], 2, 2, 32, 16, F32)
    n = batch.q.shape[0]
    meta = AttentionMetadata(
        slot_mapping=torch.full((n,), -1, dtype=torch.int64), query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens, block_tables=batch.block_tables, max_query_len=3, max_seq_len=200,
    )
    new_kv = torch.zeros(n, 2, 32)
    out = torch_attention(batch.q, new_kv, new_kv, batch.k_cache, batch.v_cache, meta, batch.scale)
    assert meta.backend_cache["torch"].native is not None
    _close(out, _both(batch)[1])


def test_all_decode_step_skips_the_index_arithmetic_and_matches_torch(native, paged_batch):
    batch = paged_batch([1, 1, 1, 1], [30, 1, 200, 17], 2, 2, 32, 16, F32)
    n = batch.q.shape[0]
    meta = AttentionMetadata(
        slot_mapping=torch.full((n,), -1, dtype=torch.int64), query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens, block_tables=batch.block_tables, max_query_len=1, max_seq_len=200,
        num_decode_tokens=n,
    )
    new_kv = torch.zeros(n, 2, 32)
    out = torch_attention(batch.q, new_kv, new_kv, batch.k_cache, batch.v_cache, meta, batch.scale)
    plan = meta.backend_cache["torch"]
    assert plan.native is not None and not plan.groups
    _close(out, _both(batch)[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_stay_on_torch(native, paged_batch, dtype):
    batch = paged_batch([1, 1, 2], [20, 40, 9], 2, 2, 32, 16, dtype)
    out, want = _both(batch)
    assert torch.equal(out, want)


def test_a_step_large_enough_to_run_on_every_thread_matches_torch_and_one_thread(native, paged_batch):
    # 9 sequences x ~1,000 positions x 2 KV heads is past the kernel's parallel threshold, so the
    # (sequence, KV head) items are spread over torch's threads when the library has OpenMP.
    lens = [1000, 17, 1200, 640, 1, 999, 1100, 800, 1300]
    batch = paged_batch([1] * len(lens), lens, 2, 4, 32, 16, F32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 2))
        spread, want = _both(batch)
        torch.set_num_threads(1)
        single, _ = _both(batch)
    finally:
        torch.set_num_threads(threads)
    _close(spread, want)
    assert torch.equal(spread, single)  # each item is computed the same way on any thread


def test_a_bad_block_id_in_a_parallel_step_raises(native, paged_batch):
    batch = paged_batch([1] * 8, [1100] * 8, 2, 2, 32, 16, F32)
    tables = batch.block_tables.clone()
    tables[5, 3] = batch.k_cache.shape[0]
    with pytest.raises(IndexError, match="outside the KV cache"):
        _both(batch, tables=tables)


def test_block_id_outside_the_cache_raises(native, paged_batch):
    batch = paged_batch([1, 1], [20, 40], 2, 2, 32, 16, F32)
    tables = batch.block_tables.clone()
    tables[1, 1] = batch.k_cache.shape[0]
    with pytest.raises(IndexError, match="outside the KV cache"):
        _both(batch, tables=tables)


def test_disabled_by_env_gives_the_torch_result(monkeypatch, fresh_load, paged_batch, caplog):
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
    with caplog.at_level(logging.INFO, logger=cpu_native.__name__):
        assert cpu_native.load() is None
    assert cpu_native.ENV_SWITCH in caplog.text
    batch = paged_batch([1, 2, 1], [20, 5, 70], 2, 2, 32, 16, F32)
    plan = ref.plan_paged_attention(batch.query_start_loc, batch.seq_lens, batch.block_tables, 16,
                                    native=True)
    assert plan.native is None
    out, want = _both(batch)
    assert torch.equal(out, want)


def test_missing_compiler_gives_the_torch_result(monkeypatch, fresh_load, tmp_path, paged_batch, caplog):
    monkeypatch.setenv("LLMSERVE_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.setattr(cpu_native, "find_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger=cpu_native.__name__):
        assert cpu_native.load() is None
    assert "no C compiler" in caplog.text
    batch = paged_batch([1, 1], [20, 70], 2, 2, 32, 16, F32)
    out, want = _both(batch)
    assert torch.equal(out, want)


@needs_compiler
def test_compile_error_gives_the_torch_result(monkeypatch, fresh_load, tmp_path, caplog):
    broken = tmp_path / "broken.c"
    broken.write_text("int this is not C;\n")
    monkeypatch.setenv("LLMSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_native, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger=cpu_native.__name__):
        assert cpu_native.load() is None
    assert "failed" in caplog.text
    assert not list((tmp_path / "native").iterdir())  # no half-written library left behind


@needs_compiler
def test_compiler_rejecting_march_native_gets_the_portable_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_native, "FLAG_SETS", (cpu_native.FLAGS + ("-march=no-such-cpu",),
                                                  cpu_native.FLAGS))
    library = cpu_native.build(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [library.name]
    assert cpu_native.build(tmp_path) == library


@needs_compiler
def test_a_build_that_does_not_load_gives_way_to_the_next_flag_set(monkeypatch, tmp_path):
    # Compiles (a shared library may leave symbols undefined) but dlopen rejects it, as it would
    # an OpenMP build whose runtime this process cannot take.
    header = tmp_path / "missing.h"
    header.write_text("extern int llmserve_no_such_symbol;\n"
                      "__attribute__((constructor)) static void probe(void) "
                      "{ llmserve_no_such_symbol = 1; }\n")
    unloadable = cpu_native.FLAGS + ("-include", str(header))
    monkeypatch.setattr(cpu_native, "FLAG_SETS", (unloadable, cpu_native.FLAGS))
    monkeypatch.setenv("LLMSERVE_CACHE", str(tmp_path))
    lib = cpu_native.open_library()
    assert hasattr(lib, "llmserve_paged_decode_f32")
    assert len(list((tmp_path / "native").iterdir())) == 2  # both built, the second loaded
    with pytest.raises(OSError, match="llmserve_no_such_symbol"):
        ctypes.CDLL(str(cpu_native.build(flag_sets=(unloadable,))))


@needs_compiler
def test_library_is_built_once_and_reused(monkeypatch, tmp_path):
    first = cpu_native.build(tmp_path)
    assert first.exists() and [p.name for p in tmp_path.iterdir()] == [first.name]

    def no_compile(*args, **kwargs):
        raise AssertionError("recompiled although the library is cached")

    monkeypatch.setattr(subprocess, "run", no_compile)
    assert cpu_native.build(tmp_path) == first


@needs_compiler
def test_concurrent_builds_leave_one_complete_library(tmp_path):
    results: list[object] = []

    def build() -> None:
        try:
            results.append(cpu_native.build(tmp_path))
        except Exception as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("LLMSERVE_CACHE", str(blocked))  # its "native" child cannot be created
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert cpu_native.cache_dir() == tmp_path / "tmp" / f"llmserve-native-{os.getuid()}"
    monkeypatch.setenv("LLMSERVE_CACHE", str(tmp_path / "ok"))
    assert cpu_native.cache_dir() == tmp_path / "ok" / "native"
