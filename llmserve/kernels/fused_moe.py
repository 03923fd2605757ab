"""Fused mixture-of-experts MLP (Triton): sort by expert, grouped GEMMs, weighted sum over top-k.

Each token picks `top_k` experts. The (token, slot) pairs are sorted by expert and every expert's
run is padded to a multiple of BLOCK_M (`moe_align`), so each BLOCK_M tile of the sorted list
belongs to one expert. Two grouped GEMMs then walk the tiles:

1. gate/up: rows of x times the tile's expert's w13 [2I, H], gate and up in one program, and
   SiLU(gate) * up written to a [T * top_k, I] intermediate (the activation is fused, so the
   2I-wide projection never reaches memory);
2. down: the intermediate times the expert's w2 [H, I], scaled by the routing weight, written
   to [T * top_k, H]; the top_k rows of each token are then summed.

The alignment is plain torch on the device without a host sync (fixed-size outputs, padding
tiles tagged with expert id E and skipped), so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.kernels.common import check_launchable, next_pow2


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the flat (token, slot) indices by expert, each expert's run padded to block_m.

    Returns (sorted_ids [max_tiles * block_m] int32, tile_expert [max_tiles] int32). A sorted id
    i = token * top_k + slot; padding entries hold T * top_k. tile_expert[b] is the expert of
    tile b, or num_experts for tiles past the last expert's run. max_tiles bounds the real
    count for any routing: sum_e ceil(c_e / block_m) <= ceil(n / block_m) + min(E, n).
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[expert_of]
    dest = (padded_end - padded)[expert_of] + rank
    max_tiles = -(-n // block_m) + min(num_experts, n)
    sorted_ids = torch.full((max_tiles * block_m,), n, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    tiles = torch.arange(max_tiles, device=device, dtype=torch.int64)
    tile_expert = torch.searchsorted(padded_end // block_m, tiles, right=True).to(torch.int32)
    return sorted_ids, tile_expert


@triton.jit
def _tile_and_column(num_tiles, num_cols, GROUP_M: tl.constexpr):
    """(tile, column block) of this program, GROUP_M tiles at a time down each column block,
    so that the tiles of one expert read its weight columns while they are still in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_cols
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(num_tiles - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ptr, tile_expert_ptr,
    num_rows, num_tiles, hidden, inter, num_experts, top_k,
    stride_xt, stride_we, stride_wn, stride_wk, stride_ot,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tile, pid_n = _tile_and_column(num_tiles, tl.cdiv(inter, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if expert >= num_experts:
        return
    rows = tl.load(sorted_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = rows < num_rows
    tokens = rows // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = offs_k + k0 < hidden
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        g = tl.load(g_ptrs, mask=w_mask, other=0.0)
        u = tl.load(u_ptrs, mask=w_mask, other=0.0)
        if IEEE:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    dtype = out_ptr.dtype.element_ty
    # Round as the unfused torch path does: each projection, SiLU(gate), then the product.
    gate = acc_g.to(dtype).to(tl.float32)
    up = acc_u.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, (act * up).to(dtype), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    a_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, tile_expert_ptr,
    num_rows, num_tiles, hidden, inter, num_experts,
    stride_at, stride_we, stride_wn, stride_wk, stride_ot,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tile, pid_n = _tile_and_column(num_tiles, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if expert >= num_experts:
        return
    rows = tl.load(sorted_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = rows < num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_at + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_mask = offs_k + k0 < inter
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    dtype = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    out = acc.to(dtype).to(tl.float32) * weight[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, out.to(dtype), mask=valid[:, None] & n_mask[None, :])


GROUP_M = 8


def moe_block_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int,
                     dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes: BLOCK_M follows the average rows per expert (decode: 16, few wasted rows)."""
    avg = num_tokens * top_k / max(1, num_experts)
    block_m = 16 if avg <= 16 else 32 if avg <= 64 else 64
    block_k = 32 if dtype == torch.float32 else 64
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": max(16, min(64, next_pow2(max(hidden, inter)))),
        "BLOCK_K": max(16, min(block_k, next_pow2(min(hidden, inter)))),
        "num_warps": 4,
    }


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
           topk_ids: torch.Tensor) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("fused_moe expects x [T, H], w13 [E, 2I, H] and w2 [E, H, I]")
    num_experts, two_i, hidden = w13.shape
    if x.shape[1] != hidden or two_i % 2 or tuple(w2.shape) != (num_experts, hidden, two_i // 2):
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError("topk_ids and topk_weights must both be [T, top_k]")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"x, w13 and w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    check_launchable(x, w13, w2, topk_weights, topk_ids)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict[str, int] | None = None) -> torch.Tensor:
    """Triton twin of `ref.fused_moe`: sum_k topk_weights[t, k] * expert_{ids[t, k]}(x[t])."""
    _check(x, w13, w2, topk_weights, topk_ids)
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    cfg = config or moe_block_config(num_tokens, top_k, num_experts, hidden, inter, x.dtype)
    bm, bn, bk, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
    x = x if x.stride(-1) == 1 else x.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    sorted_ids, tile_expert = moe_align(topk_ids, num_experts, bm)
    rows = num_tokens * top_k
    ieee = x.dtype == torch.float32
    inter_out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    tiles = tile_expert.numel()
    _gate_up_kernel[(tiles * triton.cdiv(inter, bn),)](
        x, w13, inter_out, sorted_ids, tile_expert, rows, tiles, hidden, inter, num_experts, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), inter_out.stride(0), IEEE=ieee,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=warps,
    )
    weights = topk_weights.reshape(-1).contiguous()
    per_slot = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(tiles * triton.cdiv(hidden, bn),)](
        inter_out, w2, per_slot, weights, sorted_ids, tile_expert, rows, tiles, hidden, inter,
        num_experts, inter_out.stride(0), w2.stride(0), w2.stride(1), w2.stride(2),
        per_slot.stride(0), IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
        num_warps=warps,
    )
    torch.sum(per_slot.view(num_tokens, top_k, hidden), dim=1, out=out)
    return out
