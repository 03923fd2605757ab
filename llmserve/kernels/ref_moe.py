"""Pure-torch twin of the fused mixture-of-experts kernel: the CPU path and its oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts MLP: out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]).

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_* [T, top_k]. An
    expert is down(SiLU(gate(x)) * up(x)). The (token, slot) rows are sorted by expert once and
    one index_add sums each token's rows in ascending expert order, as transformers' expert loop
    adds them. In between, fp32 on CPU runs both projections as one grouped GEMM each
    (`torch.nn.functional.grouped_mm`, torch >= 2.9); elsewhere a loop over the hit experts. On
    CPU the count of small ops, not the arithmetic, is the cost at decode sizes: the loop pays a
    few per expert, the grouped GEMMs a few per layer.
    """
    if x.device.type != "cpu" or torch.get_num_threads() == 1:
        return _fused_moe(x, w13, w2, topk_weights, topk_ids, grouped=True)
    # Single-threaded on CPU (restored after), as the sampler: measured on the 2-core machine at
    # 128 experts, top 8, hidden 256, 2 threads were 4-25x slower than 1 at 16 to 2048 tokens.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fused_moe(x, w13, w2, topk_weights, topk_ids, grouped=True)
    finally:
        torch.set_num_threads(threads)


def fused_moe_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor) -> torch.Tensor:
    """`fused_moe` with the per-expert loop on every device (the benchmark's peer; an oracle)."""
    return _fused_moe(x, w13, w2, topk_weights, topk_ids, grouped=False)


def _fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, grouped: bool) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros_like(x)
    if num_tokens == 0:
        return out
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0])
    tokens = order // top_k
    xs = x[tokens]
    if grouped and _grouped_mm_usable(xs, w13, w2):
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = _GROUPED_MM(xs, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        ys = _GROUPED_MM(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)
    else:
        ys = _experts_loop(xs, w13, w2, counts.tolist())
    weighted = ys * topk_weights.reshape(-1)[order, None]
    return out.index_add_(0, tokens, weighted.to(out.dtype))


def _experts_loop(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each hit expert on its run of the expert-sorted rows xs."""
    ys = torch.empty(xs.shape[0], w2.shape[1], dtype=xs.dtype, device=xs.device)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        end = start + count
        gate, up = F.linear(xs[start:end], w13[expert]).chunk(2, dim=-1)
        torch.mm(F.silu(gate) * up, w2[expert].t(), out=ys[start:end])
        start = end
    return ys


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_usable(*tensors: torch.Tensor) -> bool:
    # CPU kernels exist from torch 2.9; up to 2.10 they also need 16-byte aligned operands.
    if _GROUPED_MM is None or _torch_version() < (2, 9):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.data_ptr() % 16 == 0
               for t in tensors)


def _torch_version() -> tuple[int, int]:
    try:
        major, minor = torch.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:  # an unusual version string: take the loop
        return (0, 0)
