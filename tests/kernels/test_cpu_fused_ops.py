"""The fused CPU ops (`llmserve.kernels.cpu_fused`) against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels import cpu_fused, cpu_native, ref
from llmserve.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(cpu_native.find_compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu_fused.load.cache_clear()
    if cpu_fused.load() is None:
        pytest.fail("the fused CPU ops did not build (see the warning logged by cpu_fused)")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows,dim", [(1, 256), (5, 64), (33, 100)])
def test_add_rms_norm_matches_ref_and_writes_the_sum_into_the_residual(rows, dim):
    g = gen()
    x, res, w = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g), torch.randn(dim, generator=g)
    want, want_sum = ref.rms_norm(x, w, 1e-6, res.clone())
    residual = res.clone()
    got, got_sum = cpu_fused.add_rms_norm(x, w, 1e-6, residual)
    assert got_sum is residual  # updated in place
    torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    alone, none = cpu_fused.add_rms_norm(x, w, 1e-6)
    assert none is None
    torch.testing.assert_close(alone, ref.rms_norm(x, w, 1e-6)[0], rtol=1e-6, atol=1e-6)


def test_add_rms_norm_reads_strided_rows():
    g = gen(1)
    wide = torch.randn(4, 96, generator=g)
    x, w = wide[:, 16:80], torch.randn(64, generator=g)  # row stride 96, not 64
    got, _ = cpu_fused.add_rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, ref.rms_norm(x.contiguous(), w, 1e-5)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("head_dim", [32, 64, 12])
def test_qk_norm_rope_matches_norm_then_rotary_and_leaves_v_alone(qk_norm, head_dim):
    g = gen(2)
    rows, heads, kv_heads = 7, 4, 2
    rope = RotaryEmbedding(head_dim, 512, 10000.0)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g)
    positions = torch.tensor([0, 1, 5, 100, 511, 3, 3])
    qw = torch.randn(head_dim, generator=g) if qk_norm else None
    kw = torch.randn(head_dim, generator=g) if qk_norm else None
    q = qkv[:, : heads * head_dim].reshape(rows, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].reshape(rows, kv_heads, head_dim)
    if qk_norm:
        q, k = ref.rms_norm(q, qw, 1e-6)[0], ref.rms_norm(k, kw, 1e-6)[0]
    want_q, want_k = ref.rotary_embedding(positions, q, k, rope.cos_sin_cache)
    got = cpu_fused.qk_norm_rope_(qkv.clone(), positions.int(), rope.cos_sin_cache, heads, kv_heads,
                                  head_dim, qw, kw, 1e-6)
    torch.testing.assert_close(got[:, : heads * head_dim].view(rows, heads, head_dim), want_q,
                               rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got[:, heads * head_dim : (heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim),
                               want_k, rtol=2e-6, atol=2e-6)
    assert torch.equal(got[:, (heads + kv_heads) * head_dim :], qkv[:, (heads + kv_heads) * head_dim :])


def test_qk_norm_rope_rejects_a_position_past_the_cache():
    rope = RotaryEmbedding(16, 8, 10000.0)
    qkv = torch.zeros(2, 3 * 16)
    with pytest.raises(IndexError, match="rotary cache"):
        cpu_fused.qk_norm_rope_(qkv, torch.tensor([1, 8]), rope.cos_sin_cache, 1, 1, 16)


def test_silu_and_mul_matches_torch_including_large_gates():
    g = gen(3)
    x = torch.randn(9, 2 * 300, generator=g) * 8
    x[0, :6] = torch.tensor([0.0, -0.0, 80.0, -80.0, 88.0, -87.0])
    torch.testing.assert_close(cpu_fused.silu_and_mul(x), ref.silu_and_mul(x), rtol=1e-6, atol=1e-30)
    # A view with a wider row stride (a slice of a bigger buffer) reads the right elements.
    wide = torch.randn(3, 2 * 64 + 5, generator=g)
    view = wide[:, : 2 * 64]
    torch.testing.assert_close(cpu_fused.silu_and_mul(view), ref.silu_and_mul(view.contiguous()),
                               rtol=1e-6, atol=1e-30)


def _on_threads(n: int, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_prefill_sized_calls_split_over_threads_give_the_one_thread_results():
    # Every call below is past the kernels' parallel threshold (65,536 elements).
    g = gen(4)
    rows, heads, kv_heads, head_dim = 700, 8, 2, 32
    x, res, w = (torch.randn(rows, 256, generator=g), torch.randn(rows, 256, generator=g),
                 torch.randn(256, generator=g))
    gate_up = torch.randn(rows, 2 * 512, generator=g) * 4
    rope = RotaryEmbedding(head_dim, 2048, 10000.0)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g)
    positions = torch.randint(0, 2048, (rows,), generator=g)
    qn, kn = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)

    def run() -> list[torch.Tensor]:
        residual = res.clone()
        normed, _ = cpu_fused.add_rms_norm(x, w, 1e-6, residual)
        roped = cpu_fused.qk_norm_rope_(qkv.clone(), positions, rope.cos_sin_cache, heads,
                                        kv_heads, head_dim, qn, kn, 1e-6)
        return [normed, residual, roped, cpu_fused.silu_and_mul(gate_up)]

    spread, single = _on_threads(max(2, torch.get_num_threads()), run), _on_threads(1, run)
    for a, b in zip(spread, single):
        assert torch.equal(a, b)
    torch.testing.assert_close(spread[0], ref.rms_norm(x, w, 1e-6, res.clone())[0],
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(spread[3], ref.silu_and_mul(gate_up), rtol=1e-6, atol=1e-30)


def test_wrappers_refuse_what_the_kernels_cannot_read():
    with pytest.raises(ValueError, match="float32"):
        cpu_fused.silu_and_mul(torch.zeros(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="unit last stride"):
        cpu_fused.add_rms_norm(torch.zeros(8, 4).t(), torch.ones(8), 1e-6)


def test_library_is_cached_under_its_source_name(tmp_path):
    first = cpu_native.build(tmp_path, source=cpu_fused.SOURCE)
    assert first.name.startswith("fused_ops-") and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_native.build(tmp_path, source=cpu_fused.SOURCE) == first  # found, not rebuilt
    assert first.stat().st_mtime_ns == stamp
    assert cpu_native.build(tmp_path).name.startswith("paged_decode-")  # the default stays


def test_native_kernels_switch_turns_the_fused_ops_off(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
    cpu_fused.load.cache_clear()
    try:
        assert cpu_fused.load() is None
    finally:
        monkeypatch.delenv(cpu_native.ENV_SWITCH)
        cpu_fused.load.cache_clear()
    assert cpu_fused.load() is not None


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 15), (4, 16), (5, 17), (64, 32000), (2, 1000)])
def test_argmax_rows_matches_torch_max_indices(rows, n):
    # Lengths around the 16 lanes of the scan: fewer, exactly, one past; the last two are a
    # vocabulary-sized call past the parallel threshold and a strided view of wider rows.
    g = gen(5)
    x = torch.randn(rows, n + 7, generator=g)[:, :n] if n == 1000 else torch.randn(rows, n, generator=g)
    assert torch.equal(cpu_fused.argmax_rows(x), x.max(dim=-1).indices)


def test_argmax_rows_takes_the_first_of_equal_maxima_and_the_first_nan():
    x = torch.zeros(6, 40)
    x[1, [3, 19, 35]] = 2.0  # equal maxima in different lanes: the first index wins
    x[2, [20, 4]] = 1.0  # a later lane holds the earlier index
    x[3, [17, 33]] = float("nan")  # NaN beats every number, the first one is taken
    x[3, 5] = float("inf")
    x[4] = float("-inf")  # all equal: index 0
    x[5, 39] = 1.0  # the maximum in the scalar tail past the last full 16 lanes
    got = cpu_fused.argmax_rows(x)
    assert got.tolist() == [0, 3, 4, 17, 0, 39]
    assert torch.equal(got, x.max(dim=-1).indices)


def test_argmax_rows_refuses_empty_rows_and_other_dtypes():
    with pytest.raises(ValueError, match="argmax over rows of 0"):
        cpu_fused.argmax_rows(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="float32"):
        cpu_fused.argmax_rows(torch.zeros(2, 4, dtype=torch.float64))
    assert cpu_fused.argmax_rows(torch.zeros(0, 4)).shape == (0,)


def test_store_kv_writes_the_rows_index_copy_writes():
    g = gen(6)
    blocks, block, kv_heads, dim = 5, 4, 2, 8
    qkv = torch.randn(6, 4 * dim + 2 * kv_heads * dim, generator=g)  # k, v as strided views
    k = qkv[:, 4 * dim : (4 + kv_heads) * dim].view(6, kv_heads, dim)
    v = qkv[:, (4 + kv_heads) * dim :].view(6, kv_heads, dim)
    slots = torch.tensor([19, 0, 7, 8, 3, 12])
    caches = [torch.randn(blocks, block, kv_heads, dim, generator=g) for _ in range(2)]
    want = [c.clone() for c in caches]
    for cache, rows in zip(want, (k, v)):  # the torch way, by hand (ref uses the kernel now)
        cache.view(-1, kv_heads, dim).index_copy_(0, slots, rows)
    assert cpu_fused.store_kv(k, v, *caches, slots)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


def test_store_kv_refuses_a_slot_outside_the_cache_before_writing():
    k = v = torch.ones(2, 1, 4)
    caches = [torch.zeros(2, 2, 1, 4) for _ in range(2)]
    for bad in (4, -1):
        with pytest.raises(IndexError, match="outside the paged cache of 4 slots"):
            cpu_fused.store_kv(k, v, *caches, torch.tensor([1, bad]))
        assert not caches[0].any() and not caches[1].any()  # the good row was not written either
    # Tensors it does not read: the caller falls back to torch.
    assert not cpu_fused.store_kv(k.double(), v.double(), *[c.double() for c in caches],
                                  torch.tensor([0, 1]))
    assert not cpu_fused.store_kv(k, v, *caches, torch.tensor([0, 1], dtype=torch.int32))
