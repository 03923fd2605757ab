"""The inner step shared by the paged attention kernels: load one tile of keys and values from
the paged cache and fold it into an online softmax."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(
    q, acc, m_i, l_i, start, offs_m_pos, hi, table, k_cache_ptr, v_cache_ptr, kv_head, qk_scale,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_mask, lo, window,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    SLIDING: tl.constexpr,
):
    """One online-softmax step over keys [start, start + BLOCK_N) of one sequence's paged KV.

    q: [rows, BLOCK_D] queries (one KV head's group of heads for decode, a tile of query
    positions for prefill); acc / m_i / l_i: the running output, max and sum in log2 units.
    Keys at or past `hi` are masked; with CAUSAL, so are keys after each row's position
    `offs_m_pos`. With SLIDING, keys before `lo` are neither loaded (their block table entries
    may be released) nor seen, and with CAUSAL each row sees only keys > its position - `window`;
    a row may then see no key of a tile, which the softmax update tolerates. Returns the
    updated (acc, m_i, l_i).
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi
    if SLIDING:
        n_mask = n_mask & (offs_n >= lo)
    page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
    in_page = offs_n % PAGE
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(
        k_cache_ptr + page[:, None] * stride_kb + in_page[:, None] * stride_ks
        + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0,
    )
    v = tl.load(
        v_cache_ptr + page[:, None] * stride_vb + in_page[:, None] * stride_vs
        + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0,
    )
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    # Scores in log2 units (scale * log2(e) folded in) so the softmax uses exp2.
    s = s * qk_scale
    if CAUSAL:
        visible = (offs_n[None, :] <= offs_m_pos[:, None]) & n_mask[None, :]
        if SLIDING:
            visible = visible & (offs_n[None, :] > offs_m_pos[:, None] - window)
    else:
        visible = n_mask[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SLIDING:
        # A row with nothing visible so far keeps m = -inf: subtract 0 instead (no inf - inf).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
    else:
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return acc * alpha[:, None] + pv, m_new, l_i
