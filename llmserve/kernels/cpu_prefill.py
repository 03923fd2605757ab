"""Native causal attention of fresh prefills on CPU (`cpu/prefill_attention.c`), fp32.

A fresh prefill (a sequence with no cached context) attends over its own new keys only, so its
rows need no paged gather: the kernel reads q, k and v straight from the step's fused qkv rows,
for every fresh sequence of the step in one call. It is built and cached like the decode kernel
(`cpu_native`) and honours the same LLMSERVE_NATIVE_KERNELS switch; when it cannot be used,
callers stay on torch's SDPA.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import torch

from llmserve.kernels import cpu_native

SOURCE = Path(__file__).with_name("cpu") / "prefill_attention.c"
_SYMBOL = "llmserve_causal_attention_f32"
_P, _I = ctypes.c_void_p, ctypes.c_int64
# (out, q, q row stride, k, v, kv row stride, heads, kv heads, head_dim, scale, starts, lens,
#  num_seqs)
_ARGTYPES = [_P, _P, _I, _P, _P, _I, _I, _I, _I, ctypes.c_float, _P, _P, _I]
_ERRORS = {-1: "head_dim, head grouping or a sequence length the kernel does not take",
           -3: "out of memory"}
# Both vector widths the kernel is built with (8 and 16 floats) divide these head sizes.
HEAD_DIM_MULTIPLE = 16


@functools.cache
def load() -> Any | None:
    """The ctypes function, or None when it cannot be used here (reason logged once).

    Cached for the process; tests call `load.cache_clear()` after changing the environment.
    """
    fns = cpu_native.load_functions(SOURCE, {_SYMBOL: (_ARGTYPES, ctypes.c_int)},
                                    "native CPU prefill attention")
    return fns[0] if fns else None


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
    fn = load()
    if fn is None:
        raise RuntimeError("the native prefill attention is not available (see the logged reason)")
    if not out.is_contiguous() or out.shape != q.shape or out.dtype != torch.float32:
        raise ValueError(f"out must be contiguous float32 {tuple(q.shape)}")
    if (starts.dtype != torch.int64 or lens.dtype != torch.int64 or starts.shape != lens.shape
            or not starts.is_contiguous() or not lens.is_contiguous()):
        raise ValueError("starts and lens must be contiguous int64 tensors of one shape")
    if len(lens) and (int(starts.min()) < 0 or int((starts + lens).max()) > q.shape[0]):
        raise ValueError(f"a sequence runs past the {q.shape[0]} rows of q")
    status = fn(
        out.data_ptr(), q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0),
        q.shape[1], k.shape[1], q.shape[2], scale, starts.data_ptr(), lens.data_ptr(), len(lens),
    )
    if status:
        raise ValueError(f"native prefill attention: {_ERRORS.get(status, status)}")
