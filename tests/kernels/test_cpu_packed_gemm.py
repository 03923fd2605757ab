"""MKL-packed weights for decode GEMMs (`llmserve.kernels.cpu_packed_gemm`) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmserve.kernels import cpu_packed_gemm
from llmserve.kernels.cpu_packed_gemm import MAX_ROWS, MIN_ROWS, PackedLinear

pytestmark = pytest.mark.skipif(not cpu_packed_gemm.available(), reason="torch without MKL")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [0, 1, 2, 37, 64, MAX_ROWS])
@pytest.mark.parametrize("k", [256, 1024])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_f_linear(rows, k, with_bias):
    g = gen(rows + k)
    weight, x = torch.randn(300, k, generator=g), torch.randn(rows, k, generator=g)
    bias = torch.randn(300, generator=g) if with_bias else None
    packed = PackedLinear(weight, bias)
    got = packed(x)
    assert torch.equal(packed(x), got)  # a second call: nothing the first wrote leaks into it
    assert got.shape == (rows, 300) and got.dtype == torch.float32 and got.is_contiguous()
    # The packed path sums in MKL's own blocking (and one row is a GEMV for F.linear): equal to
    # float rounding, which grows with the depth of the products (entries are ~sqrt(k) here).
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=4e-6 * k**0.5)


def test_packed_linear_reads_strided_rows_and_keeps_its_own_copy():
    g = gen(1)
    weight = torch.randn(64, 32, generator=g)
    packed = PackedLinear(weight)
    wide = torch.randn(5, 48, generator=g)
    x = wide[:, 8:40]  # row stride 48, not 32
    want = F.linear(x, weight)
    weight.zero_()  # the packed copy does not read the original again
    torch.testing.assert_close(packed(x), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed(wide[:, 8:40:1].t().contiguous().t()), want, rtol=1e-6, atol=1e-6)


def test_linear_uses_the_packed_copy_only_from_min_to_max_rows():
    g = gen(2)
    weight = torch.randn(16, 8, generator=g)
    packed = PackedLinear(torch.zeros(16, 8))  # deliberately not this weight's packing
    for rows in (MIN_ROWS, MAX_ROWS):
        x = torch.randn(rows, 8, generator=g)
        assert torch.equal(cpu_packed_gemm.linear(x, weight, None, packed), torch.zeros(rows, 16))
        assert torch.equal(cpu_packed_gemm.linear(x, weight, None, None), F.linear(x, weight))
    for rows in (1, MIN_ROWS - 1, MAX_ROWS + 1):  # a GEMV over the plain weight; large calls
        x = torch.randn(rows, 8, generator=g)
        assert torch.equal(cpu_packed_gemm.linear(x, weight, None, packed), F.linear(x, weight))


@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, 37, MAX_ROWS])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_packed", [False, True])
def test_linear_into_rows_of_a_bigger_output_gives_the_same_bits(rows, with_bias, with_packed):
    g = gen(rows + 7 * with_bias)
    weight, x = torch.randn(48, 32, generator=g), torch.randn(rows, 32, generator=g)
    bias = torch.randn(48, generator=g) if with_bias else None
    packed = PackedLinear(weight, bias) if with_packed else None
    want = cpu_packed_gemm.linear(x, weight, bias, packed)
    whole = torch.full((rows + 5, 48), 7.0)
    got = cpu_packed_gemm.linear(x, weight, bias, packed, out=whole[2:rows + 2])
    assert got.data_ptr() == whole[2].data_ptr()
    assert torch.equal(whole[2:rows + 2], want)
    assert torch.equal(whole[:2], torch.full((2, 48), 7.0))  # rows around the slice untouched
    assert torch.equal(whole[rows + 2:], torch.full((3, 48), 7.0))
    wide = torch.full((rows, 60), 7.0)  # row stride 60: written through it
    if with_packed and MIN_ROWS <= rows:
        cpu_packed_gemm.linear(x, weight, bias, packed, out=wide[:, 4:52])
        assert torch.equal(wide[:, 4:52], want) and torch.equal(wide[:, 52:], torch.full((rows, 8), 7.0))


def test_packed_linear_rejects_an_out_of_the_wrong_shape():
    packed = PackedLinear(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="out must be"):
        packed(torch.zeros(2, 8), out=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="out must be"):
        packed(torch.zeros(2, 8), out=torch.zeros(4, 2).t())


def test_bad_weights_and_inputs_raise():
    with pytest.raises(ValueError, match="float32"):
        PackedLinear(torch.zeros(4, 4, dtype=torch.float64))
    packed = PackedLinear(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="rows of 8"):
        packed(torch.zeros(2, 7))


def test_plan_packs_in_order_within_the_budget():
    big, small = torch.zeros(4000, 256), torch.zeros(64, 64)
    size_big, size_small = cpu_packed_gemm.packed_bytes(big), cpu_packed_gemm.packed_bytes(small)
    assert cpu_packed_gemm.plan([big, small, small], size_big + size_small) == [True, True, False]
    # The big one does not fit: skipped, and the smaller ones after it still may.
    assert cpu_packed_gemm.plan([big, small, small], 2 * size_small) == [False, True, True]
    assert cpu_packed_gemm.plan([big, small], 0) == [False, False]


def test_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(cpu_packed_gemm.BUDGET_ENV, raising=False)
    assert cpu_packed_gemm.budget_bytes() == cpu_packed_gemm.DEFAULT_BUDGET_MB << 20
    monkeypatch.setenv(cpu_packed_gemm.BUDGET_ENV, "0")
    assert cpu_packed_gemm.budget_bytes() == 0
    monkeypatch.setenv(cpu_packed_gemm.BUDGET_ENV, "1.5")
    assert cpu_packed_gemm.budget_bytes() == 3 << 19
    for bad in ("lots", "-1"):
        monkeypatch.setenv(cpu_packed_gemm.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=cpu_packed_gemm.BUDGET_ENV):
            cpu_packed_gemm.budget_bytes()
