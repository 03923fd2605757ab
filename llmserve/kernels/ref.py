"""Pure-torch twins of every Triton kernel: the CPU path and the test oracle.

Shapes used throughout:
    q:            [num_tokens, num_heads, head_dim]          (flat batch of query rows)
    k, v:         [num_tokens, num_kv_heads, head_dim]
    k_cache:      [num_blocks, block_size, num_kv_heads, head_dim] (one layer; v_cache alike)
    slot_mapping: [num_tokens] int, slot = block_id * block_size + offset; -1 = padding, skip
    query_start_loc: [batch + 1] int, cumulative query lengths (row b owns q[qsl[b]:qsl[b+1]])
    seq_lens:     [batch] int, context length of each sequence *including* this step's tokens
    block_tables: [batch, max_blocks] int, block ids of each sequence (padding entries unused)
The query rows of sequence b sit at positions seq_lens[b] - q_len_b ... seq_lens[b] - 1 and
attend causally to every cached token at or before their position. With a sliding `window`, a
query at position p attends only to positions > p - window; block table entries wholly before
every row's window are never read (they may hold -1 once released).

The production CPU attention path (a per-step plan, then one call per layer) is in
`cpu_attention`; `paged_attention` here runs it in one call. `paged_attention(...,
native=True)` sends fp32 decode rows on CPU to the C kernel of `cpu_native` when it builds;
the default stays pure torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The CPU attention planner and the MoE twin live in their own modules; their public names are
# re-exported so `ref.<kernel>` stays the one place to find every twin.
from llmserve.kernels.cpu_attention import (  # noqa: F401
    AttentionPlan,
    paged_attention_planned,
    plan_paged_attention,
    prepare_slots,
    store_kvcache_prepared,
)
from llmserve.kernels.ref_moe import fused_moe, fused_moe_loop  # noqa: F401


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write this step's keys and values into their slots; slot -1 is padding and is skipped."""
    store_kvcache_prepared(k, v, k_cache, v_cache, *prepare_slots(slot_mapping))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    native: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of a flat batch of query rows over paged KV (prefill, extend and decode).

    Decode rows (one query) are batched together; sequences with several query rows are padded
    to the longest of them. Both groups are one vectorised call, never a loop over tokens.
    `native` sends the decode rows to the C kernel when it can take them (see
    `plan_paged_attention`). `window`: a sliding window (each query sees its last `window`
    positions), None for full causal attention.
    """
    plan = plan_paged_attention(
        query_start_loc, seq_lens, block_tables, k_cache.shape[1], native=native, window=window
    )
    return paged_attention_planned(q, k_cache, v_cache, plan, scale)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm, optionally fused with a residual add: returns (normed, new residual).

    With a residual, the input is `x + residual`; the sum is returned as the new residual.
    Computed in float32 and cast back, as Hugging Face's Llama does.
    """
    if x.dtype == weight.dtype == torch.float32:
        # One fused op instead of six small ones (the CPU engine runs this twice per layer per
        # step); bitwise equal to the formula below in float32 (checked on the pinned torch).
        h = x if residual is None else x + residual
        return F.rms_norm(h, (h.shape[-1],), weight, eps), (None if residual is None else h)
    # Casts only where the dtype changes: on CPU even a no-op cast costs as much as a small
    # kernel.
    orig_dtype = x.dtype
    h = _as(x, torch.float32)
    if residual is not None:
        h = h + _as(residual, torch.float32)
        residual = _as(h, orig_dtype)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * _as(h, orig_dtype), residual


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (rotate halves), as Llama/Qwen checkpoints on the Hub use.

    q: [T, H, D], k: [T, KVH, D], cos_sin_cache: [max_pos, D] holding cos in the first half and
    sin in the second, float32. Returns new q and k in their input dtype.
    """
    cos, sin = rotary_rows(cos_sin_cache, positions)
    return rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)


def rotary_rows(cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ([T, 1, D]) full-width cos and sign-folded sin for `rotate_neox`:
    cos2 = [cos, cos] and sin2 = [-sin, sin], so that rotating needs no split and no concat."""
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)
    return torch.cat((cos, cos), -1)[:, None, :], torch.cat((-sin, sin), -1)[:, None, :]


def rotate_neox(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """x * cos2 + rotate_half(x) * sin2, in float32. `roll` by half a head puts the second half
    first; with the sign folded into sin2 this is exactly (x1 cos - x2 sin, x2 cos + x1 sin)."""
    xf = _as(x, torch.float32)
    out = xf * cos2 + xf.roll(x.shape[-1] // 2, -1) * sin2
    return _as(out, x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused [.., 2 * d] gate/up projection."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
