"""The CPU RMSNorm (`llmserve.kernels.ref.rms_norm`) against transformers' LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llmserve.kernels import ref

SHAPES = [(128, 16), (320, 3), (1024, 1), (4096, 7)]


def _inputs(dtype, hidden, rows):
    gen = torch.Generator().manual_seed(hidden + rows)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    hf = LlamaRMSNorm(hidden, eps=1e-6).to(dtype).requires_grad_(False)
    hf.weight.copy_(torch.randn(hidden, generator=gen))
    return x, residual, hf


@pytest.mark.parametrize("hidden,rows", SHAPES)
def test_float32_with_residual_is_bitwise_transformers(hidden, rows):
    # float32 is the CPU engine's dtype and takes the fused torch op.
    x, residual, hf = _inputs(torch.float32, hidden, rows)
    out, new_residual = ref.rms_norm(x, hf.weight, 1e-6, residual)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(out, hf(x + residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden,rows", SHAPES)
def test_without_residual_is_bitwise_transformers(dtype, hidden, rows):
    x, _, hf = _inputs(dtype, hidden, rows)
    assert torch.equal(ref.rms_norm(x, hf.weight, 1e-6)[0], hf(x))
