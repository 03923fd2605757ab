"""Fused RMSNorm with an optional residual add (Triton), one program per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.kernels.common import check_launchable, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, eps,
    stride_x, stride_r, stride_o, stride_nr,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = h + r.to(tl.float32)
        # The new residual is rounded to the activation dtype, as the torch twin does.
        tl.store(new_residual_ptr + row * stride_nr + offs, h.to(x.dtype), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / HIDDEN + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    # Round the normalised value to the activation dtype before the weight, like HF Llama.
    normed = (h * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, normed.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of `ref.rms_norm`: returns (normed, x + residual or None)."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    check_launchable(x, weight, *([residual] if residual is not None else []))
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = residual.reshape(-1, hidden).contiguous() if residual is not None else x2
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    new_residual = torch.empty_like(x2) if residual is not None else out
    rows = x2.shape[0]
    if rows:
        block = next_pow2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, new_residual, eps,
            x2.stride(0), r2.stride(0), out.stride(0), new_residual.stride(0),
            HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 256)),
        )
    out = out.view(x.shape)
    return out, (new_residual.view(x.shape) if residual is not None else None)
