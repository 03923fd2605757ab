"""RMSNorm (+ residual), rotary embedding and SiLU-and-mul against their torch twins."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels import ref
from llmserve.kernels.activation import silu_and_mul
from llmserve.kernels.rmsnorm import rms_norm
from llmserve.kernels.rotary import rotary_embedding

DTYPES = [torch.float32, torch.float16]


def _rand(*shape: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_ref_with_and_without_residual(device, tol, dtype, with_residual):
    x = _rand(2, 3, 96, dtype=dtype, device=device)  # hidden 96: not a power of two
    weight = _rand(96, dtype=dtype, device=device, seed=1)
    residual = _rand(2, 3, 96, dtype=dtype, device=device, seed=2) if with_residual else None
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    want, want_res = ref.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, want, **tol(dtype))
    if with_residual:
        torch.testing.assert_close(new_res, want_res, atol=0, rtol=0)
    else:
        assert new_res is None


def _cos_sin_cache(max_pos: int, head_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.float16, 128)])
def test_rotary_rotates_strided_q_and_k_in_place(device, tol, dtype, head_dim):
    tokens, heads, kv_heads = 5, 4, 2
    qkv = _rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    positions = torch.tensor([0, 3, 9, 4, 31], device=device)
    cache = _cos_sin_cache(32, head_dim, device)
    want_q, want_k = ref.rotary_embedding(positions, q, k, cache)
    got_q, got_k = rotary_embedding(positions, q, k, cache)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, want_q, **tol(dtype))
    torch.testing.assert_close(k, want_k, **tol(dtype))
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)


def test_rotary_rejects_a_cache_of_the_wrong_width(device):
    q = torch.zeros(2, 2, 64, device=device)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_embedding(torch.zeros(2, dtype=torch.long, device=device), q, q.clone(),
                         _cos_sin_cache(8, 32, device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_ref(device, tol, dtype):
    x = _rand(3, 2, 2 * 1100, dtype=dtype, device=device)  # d = 1100 spans two tiles of 1024
    torch.testing.assert_close(silu_and_mul(x), ref.silu_and_mul(x), **tol(dtype))


def test_silu_and_mul_rejects_an_odd_width(device):
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 7, device=device))
