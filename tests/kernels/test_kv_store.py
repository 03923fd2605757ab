"""KV-cache store by slot mapping against the torch twin."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels import ref
from llmserve.kernels.kv_store import store_kvcache


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.float16, 128)])
def test_store_writes_slots_and_skips_padding(device, dtype, head_dim):
    kv_heads, num_blocks, block = 2, 4, 16
    gen = torch.Generator().manual_seed(0)
    # k and v as strided views of one fused projection, as the attention layer produces them.
    qkv = torch.randn(6, (4 + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
    k = qkv[:, 4 * head_dim : (4 + kv_heads) * head_dim].view(6, kv_heads, head_dim)
    v = qkv[:, (4 + kv_heads) * head_dim :].view(6, kv_heads, head_dim)
    slots = torch.tensor([17, -1, 0, 63, -1, 40], dtype=torch.int64, device=device)
    cache = torch.randn(num_blocks, block, kv_heads, head_dim, generator=gen).to(device, dtype)
    k_cache, v_cache = cache.clone(), cache.clone() + 1
    k_want, v_want = k_cache.clone(), v_cache.clone()
    ref.store_kvcache(k, v, k_want, v_want, slots)
    store_kvcache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[17], k[0])
    # Slots that only padding rows pointed at keep their old contents.
    untouched = torch.ones(num_blocks * block, dtype=torch.bool)
    untouched[[17, 0, 63, 40]] = False
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[untouched.to(device)],
                       cache.view(-1, kv_heads, head_dim)[untouched.to(device)])


def test_store_rejects_a_cache_that_does_not_fit(device):
    k = torch.zeros(3, 2, 64, device=device)
    cache = torch.zeros(2, 16, 4, 64, device=device)
    with pytest.raises(ValueError, match="does not fit"):
        store_kvcache(k, k, cache, cache.clone(), torch.zeros(3, dtype=torch.int64, device=device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors are only refused without CUDA")
def test_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    k = torch.zeros(1, 1, 64)
    cache = torch.zeros(1, 16, 1, 64)
    with pytest.raises(ValueError, match="CUDA"):
        store_kvcache(k, k, cache, cache.clone(), torch.zeros(1, dtype=torch.int64))
