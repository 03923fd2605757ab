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
attend causally to every cached token at or before their position.

`paged_attention(..., native=True)` (what the engine's torch backend asks for) sends fp32 decode
rows on CPU to the C kernel of `cpu_native` when it builds; the default stays pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmserve.kernels import cpu_native


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write this step's keys and values into their slots; slot -1 is padding and is skipped."""
    store_kvcache_prepared(k, v, k_cache, v_cache, *prepare_slots(slot_mapping))


def prepare_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(int64 slots to write, mask of the rows they come from or None for all rows): the
    layer-independent half of `store_kvcache`, done once per step."""
    keep = slot_mapping >= 0
    if bool(keep.all()):
        return slot_mapping.long(), None
    return slot_mapping[keep].long(), keep


def store_kvcache_prepared(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    keep: torch.Tensor | None,
) -> None:
    """`store_kvcache` with the slots from `prepare_slots`."""
    if keep is not None:
        k, v = k[keep], v[keep]
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if k.dtype != k_cache.dtype:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slots, v)


@dataclass
class _Group:
    """Sequences attended together: their query rows, padded layout, block ids and mask."""

    token_rows: torch.Tensor  # [n] rows of q (and out) this group owns
    pad_index: tuple[torch.Tensor, torch.Tensor] | None  # (seq, offset) of each row; None = decode
    block_ids: torch.Tensor  # [num_seqs * num_blocks] block ids to gather, sequence-major
    num_seqs: int
    max_q: int
    max_kv: int
    mask: torch.Tensor  # [num_seqs, max_q, max_kv] bool, True = attend


@dataclass
class AttentionPlan:
    """Everything about a step's attention that does not depend on the layer.

    Built once per step (index arithmetic, masks, gather ids) and reused by every layer, so a
    layer only gathers its blocks and runs attention. With `native`, the decode rows are not in
    `groups`: the C kernel of `cpu_native` reads them from the paged cache in place.
    """

    groups: list[_Group]
    block_size: int
    native: cpu_native.DecodeBatch | None = None
    # (first row, end row) of fresh prefills (no cached context): they attend over their own
    # new keys with a causal SDPA, without gathering or a mask.
    fresh: list[tuple[int, int]] = field(default_factory=list)

    def use_torch_for_decode(self) -> None:
        """Turn the native decode rows into a torch group, for a layer whose tensors the kernel
        does not take (the whole step then stays on torch)."""
        if self.native is not None:
            batch, self.native = self.native, None
            self.groups.insert(0, _decode_group(
                batch.rows, batch.block_tables, batch.seq_lens, self.block_size))


def plan_paged_attention(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    native: bool = False,
    num_decodes: int | None = None,
    fresh_prefill: bool = False,
) -> AttentionPlan:
    """Split a flat batch into decode rows (batched together) and multi-token sequences (padded).

    `native` asks for the decode rows to go to the C kernel (`cpu_native`) when it is loaded and
    the batch is on CPU; the default is the pure-torch path, the test oracle. `num_decodes`, when
    the caller knows it, is how many leading sequences are single-token decodes. With
    `fresh_prefill`, sequences with no cached context go to `AttentionPlan.fresh` (the caller
    then passes the step's own k and v to `paged_attention_planned`).
    """
    device = seq_lens.device
    use_native = native and device.type == "cpu" and cpu_native.load() is not None
    if use_native and num_decodes == len(seq_lens):
        # Every sequence is a decode (the common step): its tensors are the whole batch's, with
        # none of the index arithmetic below.
        plan = AttentionPlan([], block_size)
        plan.native = cpu_native.DecodeBatch.build(block_tables, seq_lens, query_start_loc[:-1])
        return plan
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    is_decode = q_lens == 1
    plan = AttentionPlan([], block_size)
    decode_idx = torch.nonzero(is_decode).flatten()
    extend = ~is_decode & (q_lens > 0)
    if fresh_prefill:
        fresh = extend & (q_lens == seq_lens)
        if bool(fresh.any()):
            starts = query_start_loc[:-1][fresh].tolist()
            plan.fresh = [(a, a + n) for a, n in zip(starts, q_lens[fresh].tolist())]
            extend &= ~fresh
    extend_idx = torch.nonzero(extend).flatten()
    if decode_idx.numel():
        rows = query_start_loc[:-1][decode_idx].long()
        tables, lens = block_tables[decode_idx], seq_lens[decode_idx]
        if use_native:
            plan.native = cpu_native.DecodeBatch.build(tables, lens, rows)
        else:
            plan.groups.append(_decode_group(rows, tables, lens, block_size))
    if extend_idx.numel():
        lens, qlens = seq_lens[extend_idx], q_lens[extend_idx]
        max_q, max_kv = int(qlens.max()), int(lens.max())
        seq_of_row = torch.repeat_interleave(torch.arange(len(extend_idx), device=device), qlens)
        offset = torch.arange(int(qlens.sum()), device=device) - torch.repeat_interleave(
            torch.cumsum(qlens, 0) - qlens, qlens
        )
        q_pos = (lens - qlens)[:, None] + torch.arange(max_q, device=device)[None, :]
        plan.groups.append(_Group(
            token_rows=(query_start_loc[:-1][extend_idx][seq_of_row] + offset).long(),
            pad_index=(seq_of_row, offset),
            block_ids=_block_ids(block_tables[extend_idx], max_kv, block_size),
            num_seqs=len(extend_idx), max_q=max_q, max_kv=max_kv,
            mask=torch.arange(max_kv, device=device)[None, None, :] <= q_pos[:, :, None],
        ))
    return plan


def _decode_group(
    rows: torch.Tensor, block_tables: torch.Tensor, lens: torch.Tensor, block_size: int
) -> _Group:
    """Decode rows (one query each) as one torch group: gather ids and a padding mask."""
    max_kv = int(lens.max())
    mask = (torch.arange(max_kv, device=lens.device)[None, :] < lens[:, None])[:, None, :]
    return _Group(
        token_rows=rows, pad_index=None, block_ids=_block_ids(block_tables, max_kv, block_size),
        num_seqs=len(rows), max_q=1, max_kv=max_kv, mask=mask,
    )


def _block_ids(block_tables: torch.Tensor, max_kv: int, block_size: int) -> torch.Tensor:
    return block_tables[:, : -(-max_kv // block_size)].reshape(-1).long()


def _gather_kv(cache: torch.Tensor, group: _Group) -> torch.Tensor:
    """[num_seqs, max_kv, kv_heads, head_dim]: each sequence's context, gathered from its blocks."""
    # index_select over whole blocks (one contiguous row each) is much faster than advanced
    # indexing on CPU.
    gathered = torch.index_select(cache.view(cache.shape[0], -1), 0, group.block_ids)
    return gathered.view(group.num_seqs, -1, *cache.shape[2:])[:, : group.max_kv]


def _attend(
    q: torch.Tensor,  # [B, Lq, H, D]
    k: torch.Tensor,  # [B, Lk, KVH, D]
    v: torch.Tensor,
    mask: torch.Tensor,  # [B, Lq, Lk] bool, True = attend
    scale: float,
) -> torch.Tensor:
    # enable_gqa lets SDPA broadcast KV heads over their query groups without copying them.
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                   ) -> torch.Tensor:
    """Causal attention of one sequence over itself ([L, H, D] / [L, KVH, D]): SDPA's fused
    causal kernel, no mask tensor."""
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def paged_attention_planned(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
    scale: float, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention` with the layer-independent work already done by `plan_paged_attention`.

    `k` and `v` (this step's new keys and values, row-aligned with `q`) are needed when the
    plan has fresh prefills."""
    if plan.fresh:
        if k is None or v is None:
            raise ValueError("a plan with fresh prefills needs the step's own k and v")
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        for start, end in plan.fresh:
            out[start:end] = _attend_causal(q[start:end], k[start:end], v[start:end], scale)
        if plan.native is not None and cpu_native.accepts(q, k_cache, v_cache):
            cpu_native.paged_decode(out, q, k_cache, v_cache, plan.native, scale)
        elif plan.native is not None:
            plan.use_torch_for_decode()
        return _attend_groups(out, q, k_cache, v_cache, plan.groups, scale)
    if plan.native is not None:
        if cpu_native.accepts(q, k_cache, v_cache):
            # Decode rows straight from the paged cache; the kernel writes their output rows.
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
            cpu_native.paged_decode(out, q, k_cache, v_cache, plan.native, scale)
            return _attend_groups(out, q, k_cache, v_cache, plan.groups, scale)
        plan.use_torch_for_decode()
    if len(plan.groups) == 1 and plan.groups[0].pad_index is None and plan.groups[0].num_seqs == q.shape[0]:
        # Every row is a decode, in order (the common step): no scatter into an output buffer.
        group = plan.groups[0]
        return _attend(q[:, None], _gather_kv(k_cache, group), _gather_kv(v_cache, group),
                       group.mask, scale)[:, 0]
    return _attend_groups(torch.empty_like(q), q, k_cache, v_cache, plan.groups, scale)


def _attend_groups(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[_Group],
    scale: float,
) -> torch.Tensor:
    """Write each group's attention into its rows of `out`."""
    for group in groups:
        k = _gather_kv(k_cache, group)
        v = _gather_kv(v_cache, group)
        if group.pad_index is None:  # decode rows: one query each
            out[group.token_rows] = _attend(q[group.token_rows][:, None], k, v, group.mask, scale)[:, 0]
        else:
            seq, offset = group.pad_index
            q_pad = q.new_zeros(group.num_seqs, group.max_q, *q.shape[1:])
            q_pad[seq, offset] = q[group.token_rows]
            out[group.token_rows] = _attend(q_pad, k, v, group.mask, scale)[seq, offset]
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    native: bool = False,
) -> torch.Tensor:
    """Causal attention of a flat batch of query rows over paged KV (prefill, extend and decode).

    Decode rows (one query) are batched together; sequences with several query rows are padded
    to the longest of them. Both groups are one vectorised call, never a loop over tokens.
    `native` sends the decode rows to the C kernel when it can take them (see
    `plan_paged_attention`).
    """
    plan = plan_paged_attention(
        query_start_loc, seq_lens, block_tables, k_cache.shape[1], native=native
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
