"""SiLU-and-mul for a fused gate/up projection (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.kernels.common import check_launchable, next_pow2


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + D + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Round SiLU(gate) to the activation dtype before the product, as the torch twin does.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of `ref.silu_and_mul`: x [..., 2 * d] -> SiLU(x[..., :d]) * x[..., d:]."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dimension must be even (gate and up halves), got {x.shape[-1]}")
    check_launchable(x)
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    if x2.shape[0] and d:
        block = min(1024, next_pow2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, x2.stride(0), out.stride(0), D=d, BLOCK=block, num_warps=4
        )
    return out.view(*x.shape[:-1], d)
