"""Prefill / extend attention over the paged KV cache for variable-length query rows (Triton).

Each sequence of the flat batch owns query rows `q[qsl[b]:qsl[b+1]]` at positions
`seq_len - q_len ... seq_len - 1`; they attend causally to the whole cached context, so a
fresh prefill, a prefix-cache hit and a chunk of a chunked prefill are the same case. The
keys and values (this step's included) are read from the cache, so the K/V store runs first.
One program handles BLOCK_M query rows of one head: key tiles wholly below the diagonal skip
the causal mask; only the last few tiles apply it. With a sliding window the key loop starts at
the first row's window (entries before it in the block table are never read) and every tile
applies the causal and window masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.kernels.attention_tile import attend_tile
from llmserve.kernels.common import StepLaunch, check_launchable, launch_key, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, qsl_ptr, seq_lens_ptr, block_tables_ptr, out_ptr, qk_scale,
    window, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, MIN_Q_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    SLIDING: tl.constexpr,
):
    # Heads vary fastest, so the query heads sharing a KV head run side by side and hit the same
    # K/V tiles in L2; the costliest (last, longest-context) query tiles are launched first.
    head = tl.program_id(0)
    m_start = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    seq = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if (q_len < MIN_Q_LEN) | (m_start >= q_len):  # decode rows belong to the decode kernel
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(k_cache_ptr.dtype.element_ty)
    pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    hi = tl.minimum(prefix + m_start + BLOCK_M, seq_len)
    if SLIDING:
        # The tile's first row sees keys > its position - window; later rows see fewer.
        lo = tl.maximum(prefix + m_start - window + 1, 0)
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                q, acc, m_i, l_i, start, pos, hi, table, k_cache_ptr, v_cache_ptr, kv_head,
                qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                offs_d, d_mask, lo, window, PAGE, BLOCK_N, True, IEEE, True,
            )
    else:
        # Keys before the tile's first query position are visible to every row of the tile.
        full_end = ((prefix + m_start) // BLOCK_N) * BLOCK_N
        for start in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                q, acc, m_i, l_i, start, pos, hi, table, k_cache_ptr, v_cache_ptr, kv_head,
                qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                offs_d, d_mask, 0, window, PAGE, BLOCK_N, False, IEEE, False,
            )
        for start in range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                q, acc, m_i, l_i, start, pos, hi, table, k_cache_ptr, v_cache_ptr, kv_head,
                qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                offs_d, d_mask, 0, window, PAGE, BLOCK_N, True, IEEE, False,
            )
    if SLIDING:  # rows past q_len may see no key at all: keep them finite (never stored)
        l_i = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_i[:, None]
    dst = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _default_blocks(head_dim: int, page: int, elem_bytes: int) -> tuple[int, int]:
    # Halve the tiles for float32 so K/V tiles and pipeline stages stay within shared memory.
    wide = head_dim <= 128 and elem_bytes <= 2
    return (64, max(page, 64)) if wide else (32, max(page, 32))


class ExtendPlan:
    """The extend launch of one step, worked out once and reused by every layer.

    Grid, tile sizes and constexprs depend only on the step's metadata and the model's shapes;
    `run` is then one kernel launch. A layer whose tensors have other shapes needs its own plan.
    """

    def __init__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        max_query_len: int,
        skip_decode_rows: bool = False,
        block_m: int | None = None,
        block_n: int | None = None,
        num_warps: int = 4,
        num_stages: int = 2,
        window: int | None = None,
    ) -> None:
        num_heads, head_dim = q.shape[1], q.shape[2]
        page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads"
            )
        if page < 16 or page & (page - 1):
            raise ValueError(f"block size must be a power of two >= 16, got {page}")
        check_launchable(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables)
        self.qsl, self.seq_lens, self.block_tables = query_start_loc, seq_lens, block_tables
        batch = seq_lens.shape[0]
        self.empty = batch == 0 or max_query_len <= 0
        default_m, default_n = _default_blocks(head_dim, page, k_cache.element_size())
        block_m, block_n = block_m or default_m, block_n or default_n
        grid = (num_heads, triton.cdiv(max(max_query_len, 1), block_m), batch)
        self.kernel = StepLaunch(
            _extend_kernel, grid,
            dict(GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page,
                 MIN_Q_LEN=2 if skip_decode_rows else 1, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_D=next_pow2(head_dim), IEEE=k_cache.dtype == torch.float32,
                 SLIDING=window is not None),
            num_warps=num_warps, num_stages=num_stages,
        )
        self.stride_bt = block_tables.stride(0)
        self.window = window or 0

    def run(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
        scale: float,
    ) -> None:
        """Causal attention of the query rows of `q` into `out`."""
        self.launch(launch_key(q, k_cache, v_cache, out), q, k_cache, v_cache, out, scale)

    def launch(
        self, key: object, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        out: torch.Tensor, scale: float,
    ) -> None:
        """`run` with the `StepLaunch` key given: it must cover q, the caches and out."""
        if self.empty or q.shape[0] == 0:
            return
        qs, ks, vs, ost = q.stride(), k_cache.stride(), v_cache.stride(), out.stride()
        self.kernel(
            key, q, k_cache, v_cache, self.qsl, self.seq_lens, self.block_tables, out,
            scale * LOG2E, self.window, qs[0], qs[1], ost[0], ost[1], ks[0], ks[1], ks[2], vs[0], vs[1],
            vs[2], self.stride_bt,
        )


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    skip_decode_rows: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of variable-length query rows over the paged cache.

    Shapes as in `llmserve.kernels.ref`; `max_query_len` is a host int (no device sync) that
    sizes the grid. With `skip_decode_rows`, single-token rows are left for the decode kernel.
    A caller that runs many layers over one step's metadata builds an `ExtendPlan` once instead.
    `window`: each row attends to its last `window` positions only (None: all of them).
    """
    plan = ExtendPlan(
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, max_query_len,
        skip_decode_rows=skip_decode_rows, block_m=block_m, block_n=block_n,
        num_warps=num_warps, num_stages=num_stages, window=window,
    )
    out = torch.empty_like(q) if out is None else out
    plan.launch(None, q, k_cache, v_cache, out, scale)  # one launch: nothing to relaunch
    return out
