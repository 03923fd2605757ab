"""Weights packed once by MKL for the small GEMMs of CPU decode steps.

MKL's sgemm copies ("packs") the weight into its internal layout on every call. At decode sizes
that copy is as long as the multiply: in a decode-heavy run of the small Qwen3 (64 sequences),
MKL's copy routine took 15.6% of the time and its multiply kernel 16.4%. `cblas_sgemm_pack` does
the copy once; `cblas_sgemm_compute` then multiplies any number of rows by the packed copy. The
results equal the plain call's to float rounding: bit for bit at 256-deep products of 2+ rows,
a few 1e-6 relative for 1024-deep ones or one row (the plain call's GEMV), where the order of
the sums differs. Measured on 2 cores, fp32,
interleaved: [64 x 256] x [256 x 32000] 3.7 ms packed against 5.0 ms, [64 x 256] x [256 x 2048]
0.21 against 0.25 ms. Large calls keep the original weight (`MAX_ROWS`): 8192 rows of the LM head
took 606 ms packed against 530 ms plain. Up to 1,024 rows the packed copy pays even for prefill
steps, which run their GEMMs in slices of 1,024 rows (`cpu_fast_path.SLICE_ROWS`):
with a plain weight MKL packed it again for every slice (its copy routines took ~4% of a
prefill-heavy run), and 8,192-token prefill steps took 316 ms against 293 with the packed copy
(median of 16, alternated step by step; the same bits).

MKL's packed copy is large: ~2.7x the weight plus ~7.5 MB per matrix, whatever the rows. So
weights are packed within a budget, most useful first (`plan`): LLMSERVE_CPU_PACKED_WEIGHTS_MB
(default 1024; 0 turns packing off). Where torch has no MKL (arm64, macOS), nothing is packed.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BUDGET_ENV = "LLMSERVE_CPU_PACKED_WEIGHTS_MB"
DEFAULT_BUDGET_MB = 1024
MAX_ROWS = 1024  # rows up to which the packed copy is used (see the module docstring)
MIN_ROWS = 4  # rows from which it is (see `linear`)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162


@functools.cache
def _mkl() -> Any | None:
    """libtorch_cpu's MKL packed-GEMM entry points (ctypes), or None when torch has no MKL."""
    if not torch.backends.mkl.is_available():
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        get_size, pack, compute = (lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack,
                                   lib.cblas_sgemm_compute)
    except (OSError, AttributeError) as exc:
        logger.info("MKL packed GEMM not found in torch (%s); CPU GEMMs stay unpacked", exc)
        return None
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    get_size.argtypes, get_size.restype = [i, i, i, i], ctypes.c_size_t
    pack.argtypes, pack.restype = [i, i, i, i, i, i, f, p, i, p], None
    compute.argtypes, compute.restype = [i, i, i, i, i, i, p, i, p, i, f, p, i], None
    return lib


def available() -> bool:
    """Whether weights can be packed here."""
    return _mkl() is not None


def packed_bytes(weight: torch.Tensor) -> int:
    """Size of MKL's packed copy of a [n, k] weight."""
    lib = _mkl()
    if lib is None:
        raise RuntimeError("MKL packed GEMM is not available")
    n, k = weight.shape
    return int(lib.cblas_sgemm_pack_get_size(_B_MATRIX, MAX_ROWS, n, k))


def budget_bytes() -> int:
    """The packing budget from LLMSERVE_CPU_PACKED_WEIGHTS_MB (ValueError when malformed)."""
    raw = os.environ.get(BUDGET_ENV, str(DEFAULT_BUDGET_MB)).strip()
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={raw!r} is not a number of megabytes") from None
    if mb < 0:
        raise ValueError(f"{BUDGET_ENV}={raw!r} is negative")
    return int(mb * 2**20)


def plan(weights: list[torch.Tensor], budget: int) -> list[bool]:
    """Which of `weights` (listed most useful first) to pack: in order while the packed copies
    fit in `budget` bytes; a weight that does not fit is skipped, later smaller ones may."""
    chosen, used = [], 0
    for w in weights:
        size = packed_bytes(w)
        fits = used + size <= budget
        used += size if fits else 0
        chosen.append(fits)
    return chosen


class PackedLinear:
    """`F.linear(x, weight, bias)` for float32 CPU rows, with the weight packed once by MKL.

    Holds its own packed copy; `weight` is only read while packing. Callers use it for calls of
    at most `MAX_ROWS` rows (see `linear`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        lib = _mkl()
        if lib is None:
            raise RuntimeError("MKL packed GEMM is not available")
        if weight.dim() != 2 or weight.dtype != torch.float32 or not weight.is_cpu:
            raise ValueError(f"packing needs a 2-d float32 CPU weight, got {tuple(weight.shape)} "
                             f"{weight.dtype} on {weight.device}")
        weight = weight.contiguous()
        self.n, self.k = weight.shape
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.buffer = torch.empty(-(-packed_bytes(weight) // 4), dtype=torch.float32)
        lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS, MAX_ROWS, self.n, self.k, 1.0,
                             weight.data_ptr(), self.k, self.buffer.data_ptr())
        self._compute = lib.cblas_sgemm_compute

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias), into `out` when given (see `linear`)."""
        if x.dim() != 2 or x.shape[1] != self.k or x.dtype != torch.float32 or not x.is_cpu:
            raise ValueError(f"expected float32 CPU rows of {self.k}, got {tuple(x.shape)} {x.dtype}")
        if x.stride(1) != 1 or x.stride(0) < self.k:
            x = x.contiguous()
        rows = x.shape[0]
        if out is None:
            out = torch.empty(rows, self.n, dtype=torch.float32)
        else:
            _check_out(out, rows, self.n)
        beta = 0.0
        if self.bias is not None:  # C = x W^T + C, C starting as the bias (never the bias itself)
            out.copy_(self.bias.expand(rows, self.n))
            beta = 1.0
        if rows:
            self._compute(_ROW_MAJOR, _NO_TRANS, _PACKED, rows, self.n, self.k, x.data_ptr(),
                          x.stride(0), self.buffer.data_ptr(), self.n, beta, out.data_ptr(),
                          out.stride(0))
        return out


def _check_out(out: torch.Tensor, rows: int, n: int) -> None:
    if (out.shape != (rows, n) or out.dtype != torch.float32 or not out.is_cpu
            or out.stride(1) != 1 or out.stride(0) < n):
        raise ValueError(f"out must be float32 CPU rows of shape {(rows, n)} with unit column "
                         f"stride, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedLinear | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The packed multiply for `MIN_ROWS` to `MAX_ROWS` float32 rows when there is a packed copy,
    else F.linear; written into `out` ([rows, n] float32, unit column stride, e.g. a row slice
    of a bigger output) when given, with the same bits, and returned.

    Below 4 rows MKL's plain call is a GEMV over the plain weight, which is ~2.7x smaller than
    the packed copy and so stays in cache better: measured in whole 256-token runs of the small
    Qwen3 (2 cores, rounds alternated), decode steps of 1 sequence took 2.00 ms against 2.21,
    of 2 sequences 2.11 against 2.29, of 3 sequences 2.28 against 2.56. From 4 rows on the packed
    copy wins: 2.44 against 3.17 ms at 4 sequences, 2.66 against 2.72 at 8, 3.76 against 4.09 at
    16."""
    if (packed is not None and x.dim() == 2 and MIN_ROWS <= x.shape[0] <= MAX_ROWS
            and x.dtype == torch.float32):
        return packed(x, out)
    if out is None:
        return F.linear(x, weight, bias)
    # F.linear of 2-d rows is addmm (with a bias) or mm: the same calls, into `out`.
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)
