"""Paged decode attention (one query token per sequence), GQA-aware and split-KV (Triton).

One program serves every query head of one KV head (so each K/V tile is loaded once for the
whole group) over one slice of the context. Long contexts with small batches are cut into
`num_splits` slices that run in parallel (flash-decoding); a second kernel merges the slices
with their log-sum-exp. Rows of the flat batch whose query length is not 1 are left untouched,
so a mixed prefill/decode batch can be launched without a host sync. With a sliding window the
slices cover only the last `window` positions; block table entries before them are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.kernels.attention_tile import attend_tile
from llmserve.kernels.common import (
    StepLaunch,
    check_launchable,
    launch_key,
    next_pow2,
    num_sms,
)

LOG2E = 1.4426950408889634
# A slice shorter than this costs more in the merge than it gains in parallelism.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


# num_splits changes with batch and context; not specialising on it avoids recompiles.
@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, qsl_ptr, seq_lens_ptr, block_tables_ptr,
    out_ptr, mid_o_ptr, mid_lse_ptr, qk_scale, num_splits, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    SLIDING: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) - q_row != 1:  # not a decode row: the extend kernel owns it
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # Slices are whole multiples of BLOCK_N so that only the last tile of the sequence is ragged.
    if SLIDING:  # the query at seq_len - 1 sees keys >= seq_len - window
        first = tl.maximum(seq_len - window, 0)
        per_split = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
        lo = first + split * per_split
    else:
        per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + q_row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, start, 0, hi, table, k_cache_ptr, v_cache_ptr, kv_head, qk_scale,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_mask,
            lo, window, PAGE, BLOCK_N, False, IEEE, False,  # [lo, hi) is inside the window
        )

    out_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE:  # one slice, no merge pass: write the output directly
        o = acc / l_i[:, None]
        dst = out_ptr + q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
        tl.store(dst + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials laid out [seq, head, split, BLOCK_D]; an empty slice has lse = -inf.
        empty = lo >= hi
        o = tl.where(empty, 0.0, acc / tl.maximum(l_i, 1e-30)[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.maximum(l_i, 1e-30)))
        row = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(mid_o_ptr + row[:, None] * BLOCK_D + offs_d[None, :], o, mask=out_mask)
        tl.store(mid_lse_ptr + row, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    qsl_ptr, out_ptr, mid_o_ptr, mid_lse_ptr, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) - q_row != 1:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    row = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + offs_s
    lse = tl.load(mid_lse_ptr + row, mask=s_mask, other=float("-inf"))
    parts = tl.load(
        mid_o_ptr + row[:, None] * BLOCK_D + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :], other=0.0,
    )
    # Every sequence has >= 1 token, so some slice is non-empty and the max is finite.
    weights = tl.exp2(lse - tl.max(lse, 0))
    o = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    dst = out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def choose_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, sms: int = 132, block_n: int = 64
) -> int:
    """Slices per sequence: enough programs to fill the GPU about twice, never tiny slices.

    The count is trimmed so that every slice of the longest sequence holds whole tiles of
    `block_n` keys and none is empty: 16k tokens asked to cover 264 programs with 8 KV heads
    gives 32 slices of 512, not 33 of which one is empty.
    """
    programs = max(1, batch * num_kv_heads)
    wanted = -(-2 * sms // programs)
    by_length = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    target = max(1, min(wanted, by_length, MAX_SPLITS))
    if target == 1:
        return 1
    per_split = -(-max_seq_len // target)
    per_split = -(-per_split // block_n) * block_n
    return max(1, -(-max_seq_len // per_split))


def _block_n(page: int, head_dim: int, elem_bytes: int) -> int:
    # Several pages per tile keeps enough bytes in flight per program; at least one page.
    return max(page, 64 if head_dim * elem_bytes <= 256 else 32)


def _check_shapes(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    num_heads, num_kv_heads, page = q.shape[1], k_cache.shape[2], k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    if page < 16 or page & (page - 1):
        raise ValueError(f"block size must be a power of two >= 16, got {page}")


class DecodePlan:
    """The decode launches of one step, worked out once and reused by every layer.

    Everything that depends only on the step's metadata and the model's shapes is fixed here:
    the split count, the grids, the constexprs, the merge scratch and the launchers. `run`
    then costs one or two kernel launches. Build it for the tensors of the first layer; a
    layer whose tensors have other shapes needs its own plan.
    """

    def __init__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        max_seq_len: int | None = None,
        num_splits: int | None = None,
        block_n: int | None = None,
        num_warps: int = 4,
        num_stages: int = 2,
        window: int | None = None,
    ) -> None:
        _check_shapes(q, k_cache)
        check_launchable(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables)
        num_heads, head_dim = q.shape[1], q.shape[2]
        page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        self.batch = batch = seq_lens.shape[0]
        self.qsl, self.seq_lens, self.block_tables = query_start_loc, seq_lens, block_tables
        block_n = block_n or _block_n(page, head_dim, k_cache.element_size())
        if num_splits is None:
            length = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page
            if window is not None:  # only the window is read
                length = min(length, window)
            num_splits = choose_num_splits(batch, num_kv_heads, length, num_sms(q.device), block_n)
        if not 1 <= num_splits <= 1024:
            raise ValueError(f"num_splits must be in [1, 1024], got {num_splits}")
        self.num_splits = num_splits
        block_d = next_pow2(head_dim)
        self.mid_o = self.mid_lse = None
        self.merge: StepLaunch | None = None
        if num_splits > 1 and batch:
            # One scratch for every layer: the layers run one after another on one stream.
            rows = batch * num_heads * num_splits
            self.mid_o = torch.empty(rows, block_d, device=q.device, dtype=torch.float32)
            self.mid_lse = torch.empty(rows, device=q.device, dtype=torch.float32)
            self.merge = StepLaunch(
                _decode_merge_kernel, (batch, num_heads, 1),
                dict(HEAD_DIM=head_dim, BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d),
                num_warps=2,
            )
        group = num_heads // num_kv_heads
        self.split = StepLaunch(
            _decode_split_kernel, (batch, num_kv_heads, num_splits),
            dict(GROUP=group, HEAD_DIM=head_dim, PAGE=page, SINGLE=num_splits == 1,
                 BLOCK_G=max(16, next_pow2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
                 IEEE=k_cache.dtype == torch.float32, SLIDING=window is not None),
            num_warps=num_warps, num_stages=num_stages,
        )
        self.stride_bt = block_tables.stride(0)
        self.window = window or 0

    def run(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
        scale: float,
    ) -> None:
        """Attention of the decode rows of `q` into `out` (other rows are not written)."""
        self.launch(launch_key(q, k_cache, v_cache, out), q, k_cache, v_cache, out, scale)

    def launch(
        self, key: object, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        out: torch.Tensor, scale: float,
    ) -> None:
        """`run` with the `StepLaunch` key given: it must cover q, the caches and out."""
        if self.batch == 0 or q.shape[0] == 0:
            return
        qs, ks, vs, ost = q.stride(), k_cache.stride(), v_cache.stride(), out.stride()
        mid_o = out if self.mid_o is None else self.mid_o  # unused by the single-split variant
        mid_lse = out if self.mid_lse is None else self.mid_lse
        self.split(
            key, q, k_cache, v_cache, self.qsl, self.seq_lens, self.block_tables,
            out, mid_o, mid_lse, scale * LOG2E, self.num_splits, self.window,
            qs[0], qs[1], ost[0], ost[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], self.stride_bt,
        )
        if self.merge is not None:
            self.merge(key, self.qsl, out, mid_o, mid_lse, self.num_splits, ost[0], ost[1])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    window: int | None = None,
) -> torch.Tensor:
    """Attention for the single-token (decode) rows of a flat batch; other rows are not written.

    Shapes as in `llmserve.kernels.ref`. `max_seq_len` (a host int, no sync) picks the number
    of splits; give `num_splits` to fix it (e.g. for CUDA-graph capture). `block_n`,
    `num_warps`, `num_stages` override the launch configuration (for tuning). A caller that
    runs many layers over one step's metadata builds a `DecodePlan` once instead. `window`:
    each row attends to its last `window` positions only (None: all of them).
    """
    plan = DecodePlan(
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, max_seq_len=max_seq_len,
        num_splits=num_splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
        window=window,
    )
    out = torch.empty_like(q) if out is None else out
    plan.launch(None, q, k_cache, v_cache, out, scale)  # one launch: nothing to relaunch
    return out
