"""The CPU attention path: a per-step plan of paged attention, then torch (or the native C
decode kernel) per layer.

`plan_paged_attention` does the layer-independent work once per step (which rows decode, how
the extend rows are padded, the gather indices and masks, the window's first block);
`paged_attention_planned` runs one layer with it. `ref.paged_attention` is the same
computation in one call, as the test oracle. Shapes are those of `llmserve.kernels.ref`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmserve.kernels import cpu_fused, cpu_native, cpu_prefill


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
    if keep is None and cpu_fused.load() is not None and cpu_fused.store_kv(k, v, k_cache, v_cache, slots):
        return  # fp32 on CPU: one native call instead of two index_copy_
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
    window: int | None = None  # sliding window of every layer using this plan
    # (first row, end row) of fresh prefills (no cached context): they attend over their own
    # new keys (the native kernel of `cpu_prefill`, else a causal SDPA), without gathering or a
    # mask.
    fresh: list[tuple[int, int]] = field(default_factory=list)
    # (starts, lengths) of `fresh` for the native kernel, when it is asked for and loaded.
    fresh_native: tuple[torch.Tensor, torch.Tensor] | None = None
    # Prefill chunks over cached context for the native kernel (`cpu_prefill`), when it is asked
    # for and loaded (full attention only); they are then not in `groups`.
    chunks: cpu_prefill.PagedChunks | None = None

    def use_torch_for_chunks(self) -> None:
        """Turn the native prefill chunks into a torch group (see `use_torch_for_decode`)."""
        if self.chunks is not None:
            c, self.chunks = self.chunks, None
            first_rows = torch.cat([c.starts, c.starts.new_zeros(1)])
            self.groups.append(_extend_group(first_rows, c.ctx + c.lens, c.lens, c.tables,
                                             torch.arange(len(c.lens)), self.block_size, None))

    def use_torch_for_decode(self) -> None:
        """Turn the native decode rows into a torch group, for a layer whose tensors the kernel
        does not take (the whole step then stays on torch)."""
        if self.native is not None:
            batch, self.native = self.native, None
            self.groups.insert(0, _decode_group(
                batch.rows, batch.block_tables, batch.seq_lens, self.block_size, self.window))


def plan_paged_attention(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    native: bool = False,
    num_decodes: int | None = None,
    fresh_prefill: bool = False,
    window: int | None = None,
) -> AttentionPlan:
    """Split a flat batch into decode rows (batched together) and multi-token sequences (padded).

    `native` asks for the decode rows to go to the C kernel (`cpu_native`), and fresh prefills
    and (full attention only) prefill chunks over cached context to theirs (`cpu_prefill`), when
    they are loaded and the batch is on CPU; the default is the
    pure-torch path, the test oracle. `num_decodes`, when
    the caller knows it, is how many leading sequences are single-token decodes. With
    `fresh_prefill`, sequences with no cached context go to `AttentionPlan.fresh` (the caller
    then passes the step's own k and v to `paged_attention_planned`). `window` makes every
    row attend only to its last `window` positions (None: full causal attention).
    """
    device = seq_lens.device
    use_native = native and device.type == "cpu" and cpu_native.load() is not None
    if use_native and num_decodes == len(seq_lens):
        # Every sequence is a decode (the common step): its tensors are the whole batch's, with
        # none of the index arithmetic below.
        plan = AttentionPlan([], block_size, window=window)
        plan.native = cpu_native.DecodeBatch.build(
            block_tables, seq_lens, query_start_loc[:-1], window)
        return plan
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    is_decode = q_lens == 1
    plan = AttentionPlan([], block_size, window=window)
    decode_idx = torch.nonzero(is_decode).flatten()
    extend = ~is_decode & (q_lens > 0)
    if fresh_prefill:
        fresh = extend & (q_lens == seq_lens)
        if window is not None:  # SDPA's causal mask is the window only up to its length
            fresh &= q_lens <= window
        if bool(fresh.any()):
            starts = query_start_loc[:-1][fresh].tolist()
            plan.fresh = [(a, a + n) for a, n in zip(starts, q_lens[fresh].tolist())]
            if native and device.type == "cpu" and cpu_prefill.load() is not None:
                plan.fresh_native = cpu_prefill.segments(plan.fresh)
            extend &= ~fresh
    extend_idx = torch.nonzero(extend).flatten()
    if decode_idx.numel():
        rows = query_start_loc[:-1][decode_idx].long()
        tables, lens = block_tables[decode_idx], seq_lens[decode_idx]
        if use_native:
            plan.native = cpu_native.DecodeBatch.build(tables, lens, rows, window)
        else:
            plan.groups.append(_decode_group(rows, tables, lens, block_size, window))
    if extend_idx.numel():
        if (native and window is None and device.type == "cpu"
                and cpu_prefill.load() is not None):
            plan.chunks = cpu_prefill.chunks(
                query_start_loc[:-1][extend_idx], q_lens[extend_idx],
                (seq_lens - q_lens)[extend_idx], block_tables[extend_idx])
        else:
            plan.groups.append(_extend_group(
                query_start_loc, seq_lens, q_lens, block_tables, extend_idx, block_size, window))
    return plan


def _extend_group(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, q_lens: torch.Tensor,
    block_tables: torch.Tensor, extend_idx: torch.Tensor, block_size: int, window: int | None,
) -> _Group:
    """Sequences with several query rows as one padded torch group."""
    device = seq_lens.device
    lens, qlens = seq_lens[extend_idx], q_lens[extend_idx]
    max_q = int(qlens.max())
    seq_of_row = torch.repeat_interleave(torch.arange(len(extend_idx), device=device), qlens)
    offset = torch.arange(int(qlens.sum()), device=device) - torch.repeat_interleave(
        torch.cumsum(qlens, 0) - qlens, qlens
    )
    q_pos = (lens - qlens)[:, None] + torch.arange(max_q, device=device)[None, :]
    tables = block_tables[extend_idx]
    if window is None:
        max_kv = int(lens.max())
        block_ids = _block_ids(tables, max_kv, block_size)
        mask = torch.arange(max_kv, device=device)[None, None, :] <= q_pos[:, :, None]
    else:
        # Gather from the block of each sequence's first visible key (its first query's window).
        first = (lens - qlens - window + 1).clamp_min(0) // block_size
        kv_pos, max_kv, block_ids = _window_gather(tables, first, lens, block_size)
        kv_pos = kv_pos[:, None, :]
        mask = (kv_pos <= q_pos[:, :, None]) & (kv_pos > q_pos[:, :, None] - window)
    return _Group(
        token_rows=(query_start_loc[:-1][extend_idx][seq_of_row] + offset).long(),
        pad_index=(seq_of_row, offset), block_ids=block_ids,
        num_seqs=len(extend_idx), max_q=max_q, max_kv=max_kv, mask=mask,
    )


def _decode_group(
    rows: torch.Tensor, block_tables: torch.Tensor, lens: torch.Tensor, block_size: int,
    window: int | None = None,
) -> _Group:
    """Decode rows (one query each) as one torch group: gather ids and a padding mask."""
    if window is None:
        max_kv = int(lens.max())
        block_ids = _block_ids(block_tables, max_kv, block_size)
        mask = (torch.arange(max_kv, device=lens.device)[None, :] < lens[:, None])[:, None, :]
    else:
        first = (lens - window).clamp_min(0) // block_size
        kv_pos, max_kv, block_ids = _window_gather(block_tables, first, lens, block_size)
        mask = ((kv_pos < lens[:, None]) & (kv_pos >= lens[:, None] - window))[:, None, :]
    return _Group(
        token_rows=rows, pad_index=None, block_ids=block_ids,
        num_seqs=len(rows), max_q=1, max_kv=max_kv, mask=mask,
    )


def _block_ids(block_tables: torch.Tensor, max_kv: int, block_size: int) -> torch.Tensor:
    return block_tables[:, : -(-max_kv // block_size)].reshape(-1).long()


def _window_gather(
    block_tables: torch.Tensor, first: torch.Tensor, lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Gather ids starting at each sequence's block `first` (released blocks before it are
    never read): (absolute key position of each gathered slot [n, max_kv], max_kv, ids)."""
    device = lens.device
    num = int((-(-lens // block_size) - first).max())
    index = (first[:, None] + torch.arange(num, device=device)[None, :]).clamp_max(
        block_tables.shape[1] - 1)
    # Entries past a sequence's own blocks are padding (maybe a released -1): any real block
    # does, its slots are masked.
    block_ids = block_tables.gather(1, index.long())
    max_kv = num * block_size
    kv_pos = (first * block_size)[:, None] + torch.arange(max_kv, device=device)[None, :]
    return kv_pos, max_kv, block_ids.clamp_min(0).reshape(-1).long()


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
    if plan.fresh or plan.chunks is not None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if plan.fresh:
            if k is None or v is None:
                raise ValueError("a plan with fresh prefills needs the step's own k and v")
            if plan.fresh_native is not None and cpu_prefill.accepts(q, k, v):
                cpu_prefill.causal_attention(out, q, k, v, *plan.fresh_native, scale)
            else:
                for start, end in plan.fresh:
                    out[start:end] = _attend_causal(q[start:end], k[start:end], v[start:end], scale)
        if plan.chunks is not None and cpu_prefill.accepts_paged(q, k_cache, v_cache):
            cpu_prefill.paged_prefill_attention(out, q, k_cache, v_cache, plan.chunks, scale)
        elif plan.chunks is not None:
            plan.use_torch_for_chunks()
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
