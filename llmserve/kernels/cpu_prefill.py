"""Native causal attention of prefills on CPU (`cpu/prefill_attention.c`), fp32.

A fresh prefill (a sequence with no cached context) attends over its own new keys only, so its
rows need no paged gather: `causal_attention` reads q, k and v straight from the step's fused
qkv rows, for every fresh sequence of the step in one call. A prefill chunk after cached context
(a long prompt split over steps, or a prompt after a prefix-cache hit) attends over the paged
cache as well: `paged_prefill_attention` reads its keys and values through the block table, the
chunk's own already stored. Both are built and cached like the decode kernel (`cpu_native`) and
honour the same LLMSERVE_NATIVE_KERNELS switch; when they cannot be used, callers stay on torch's
SDPA.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmserve.kernels import cpu_native

SOURCE = Path(__file__).with_name("cpu") / "prefill_attention.c"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    # (out, q, q row stride, k, v, kv row stride, heads, kv heads, head_dim, scale, starts, lens,
    #  num_seqs)
    "llmserve_causal_attention_f32": ([_P, _P, _I, _P, _P, _I, _I, _I, _I, _F, _P, _P, _I],
                                      ctypes.c_int),
    # (out, q, q row stride, k cache, v cache, block size, tables, table stride, heads, kv heads,
    #  head_dim, scale, starts, lens, ctx, num_seqs)
    "llmserve_paged_prefill_attention_f32": (
        [_P, _P, _I, _P, _P, _I, _P, _I, _I, _I, _I, _F, _P, _P, _P, _I], ctypes.c_int),
}
_ERRORS = {-1: "head_dim, head grouping or a sequence length the kernel does not take",
           -3: "out of memory"}
# Both vector widths the kernel is built with (8 and 16 floats) divide these head sizes.
HEAD_DIM_MULTIPLE = 16


@dataclass(frozen=True)
class PrefillKernels:
    """The loaded C functions (ctypes), argument types set."""

    causal: Any
    paged: Any


@functools.cache
def load() -> PrefillKernels | None:
    """The kernels, or None when they cannot be used here (reason logged once).

    Cached for the process; tests call `load.cache_clear()` after changing the environment.
    """
    fns = cpu_native.load_functions(SOURCE, _SIGNATURES, "native CPU prefill attention")
    return PrefillKernels(*fns) if fns else None


def accepts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these [tokens, heads, head_dim] views: fp32 on CPU, each token's
    heads contiguous, k and v with one row stride, head_dim a multiple of 16, grouped heads."""
    if not (q.is_cpu and k.is_cpu and v.is_cpu):
        return False
    if not (q.dtype == k.dtype == v.dtype == torch.float32):
        return False
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[1] == 0:
        return False
    d = q.shape[2]
    return (
        d % HEAD_DIM_MULTIPLE == 0 and k.shape[2] == d and q.shape[1] % k.shape[1] == 0
        and q.stride(2) == k.stride(2) == v.stride(2) == 1
        and q.stride(1) == k.stride(1) == v.stride(1) == d and k.stride(0) == v.stride(0)
    )


def segments(fresh: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths) as int64 tensors, from (first row, end row) pairs: built once per step."""
    starts = torch.tensor([a for a, _ in fresh], dtype=torch.int64)
    lens = torch.tensor([b - a for a, b in fresh], dtype=torch.int64)
    return starts, lens


def causal_attention(
    out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    starts: torch.Tensor, lens: torch.Tensor, scale: float,
) -> None:
    """Write into `out` ([tokens, heads, head_dim] contiguous) the causal attention of each
    sequence's rows `starts[i] .. starts[i] + lens[i]` of q over the same rows of k and v.
    The caller checks `accepts(q, k, v)` first; other rows of `out` are left as they are."""
    kernels = _kernels()
    _check_out(out, q)
    _check_spans(starts, lens, q.shape[0])
    status = kernels.causal(
        out.data_ptr(), q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0),
        q.shape[1], k.shape[1], q.shape[2], scale, starts.data_ptr(), lens.data_ptr(), len(lens),
    )
    if status:
        raise ValueError(f"native prefill attention: {_ERRORS.get(status, status)}")


@dataclass
class PagedChunks:
    """Prefill chunks over cached context, as `paged_prefill_attention` reads them: built once
    per step (`chunks`), used by every layer."""

    starts: torch.Tensor  # [n] int64: first row of q of each chunk
    lens: torch.Tensor  # [n] int64: its rows
    ctx: torch.Tensor  # [n] int64: cached positions before it
    tables: torch.Tensor  # [n, width] int64, contiguous: its block-table row
    # The (blocks, block size, q rows) these were last checked against: layers share one cache
    # shape and one q, so the first layer checks and the others skip it.
    checked_for: tuple[int, int, int] | None = None

    def check(self, num_blocks: int, block_size: int, rows: int) -> None:
        """Raise ValueError unless every chunk lies within `rows` rows of q and every block it
        reads is a block of such a cache."""
        if self.checked_for == (num_blocks, block_size, rows):
            return
        _check_spans(self.starts, self.lens, rows)
        n = len(self.lens)
        if self.ctx.shape != self.lens.shape or self.tables.dim() != 2 or self.tables.shape[0] != n:
            raise ValueError("ctx and tables must have one entry (row) per chunk")
        if n:
            if int(self.ctx.min()) < 0:
                raise ValueError("a chunk has negative cached context")
            used = -(-(self.ctx + self.lens) // block_size)  # blocks each chunk reads
            if int(used.max()) > self.tables.shape[1]:
                raise ValueError("a chunk runs past its block-table row")
            read = self.tables[torch.arange(self.tables.shape[1])[None, :] < used[:, None]]
            if read.numel() and (int(read.min()) < 0 or int(read.max()) >= num_blocks):
                raise ValueError(f"a block id is outside the cache's {num_blocks} blocks")
        self.checked_for = (num_blocks, block_size, rows)


def chunks(starts: torch.Tensor, lens: torch.Tensor, ctx: torch.Tensor,
           tables: torch.Tensor) -> PagedChunks:
    """`PagedChunks` from per-chunk tensors (any integer dtype)."""
    return PagedChunks(starts.long().contiguous(), lens.long().contiguous(),
                       ctx.long().contiguous(), tables.long().contiguous())


def accepts_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether `paged_prefill_attention` takes these: what the decode kernel takes
    (`cpu_native.accepts`: fp32 CPU, contiguous [blocks, block_size, kv heads, head_dim] caches,
    grouped heads), with each token's heads contiguous in q and head_dim a multiple of 16."""
    return (cpu_native.accepts(q, k_cache, v_cache) and q.stride(1) == q.shape[2]
            and q.shape[2] % HEAD_DIM_MULTIPLE == 0)


def paged_prefill_attention(
    out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    batch: PagedChunks, scale: float,
) -> None:
    """Write into `out` ([tokens, heads, head_dim] contiguous) the causal attention of each
    chunk's rows of q: row j of chunk i (position ctx[i] + j) attends to positions 0 .. ctx[i] + j
    of its sequence, read from the paged caches (the chunk's own keys must be stored already).
    The caller checks `accepts_paged(q, k_cache, v_cache)` first; other rows of `out` are left
    as they are."""
    kernels = _kernels()
    _check_out(out, q)
    block_size = k_cache.shape[1]
    batch.check(k_cache.shape[0], block_size, q.shape[0])
    status = kernels.paged(
        out.data_ptr(), q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        block_size, batch.tables.data_ptr(), batch.tables.stride(0), q.shape[1],
        k_cache.shape[2], q.shape[2], scale, batch.starts.data_ptr(), batch.lens.data_ptr(),
        batch.ctx.data_ptr(), len(batch.lens),
    )
    if status:
        raise ValueError(f"native paged prefill attention: {_ERRORS.get(status, status)}")


def _kernels() -> PrefillKernels:
    kernels = load()
    if kernels is None:
        raise RuntimeError("the native prefill attention is not available (see the logged reason)")
    return kernels


def _check_out(out: torch.Tensor, q: torch.Tensor) -> None:
    if not out.is_contiguous() or out.shape != q.shape or out.dtype != torch.float32:
        raise ValueError(f"out must be contiguous float32 {tuple(q.shape)}")


def _check_spans(starts: torch.Tensor, lens: torch.Tensor, rows: int) -> None:
    """Raise ValueError unless sequence i's rows starts[i] .. starts[i] + lens[i] lie within
    `rows` rows (host reads of two reductions: checked once per step where it can be)."""
    if (starts.dtype != torch.int64 or lens.dtype != torch.int64 or starts.shape != lens.shape
            or not starts.is_contiguous() or not lens.is_contiguous()):
        raise ValueError("starts and lens must be contiguous int64 tensors of one shape")
    if len(lens) and (int(starts.min()) < 0 or int((starts + lens).max()) > rows):
        raise ValueError(f"a sequence runs past the {rows} rows of q")
