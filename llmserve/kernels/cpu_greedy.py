"""Exact greedy tokens on CPU without the float32 LM head (`cpu/greedy_screen.c`).

A greedy row needs the argmax of its logits, not the logits. `GreedyHead` computes them
approximately with one bfloat16 GEMM (AMX / AVX512-BF16 through oneDNN), bounds the error of
every column, and scores exactly (float64) only the columns that can still be the maximum:
usually one to ten of a 32k vocabulary. Measured on 2 cores, [64 x 256] x [256 x 32000]: the
bfloat16 GEMM takes 1.3 ms where the packed float32 LM head takes 3.7-6 ms.

The token is the argmax of the exact logits h . w_j. The float32 LM head rounds those logits,
so where the two best are within float32 rounding of each other (relative ~1e-6) the two paths
may pick different ones of the pair; elsewhere they agree, as the packed and the plain float32
GEMMs do. Rows the screen cannot decide cheaply (non-finite values, logits near float32
overflow, many near-equal candidates) get the full float32 row and `argmax_rows`, so every row
gets an answer.

The error bound. bfloat16 keeps 8 significant bits (unit roundoff u = 2^-8), so rounding h and
w costs at most (2u + u^2)|h_i w_ji| per product, the float32 accumulation of K of them at most
gamma_K = K 2^-24 / (1 - K 2^-24) times their absolute sum, and the bfloat16 output one more u.
With sum_i |h_i w_ji| <= ||h|| ||w_j|| (Cauchy-Schwarz) the approximate logit is within
c ||h|| ||w_j|| of the exact one, c = (3u + 3u^2 + u^3 + 2 gamma_K) (1 + 2^-10): the last factor
and the second gamma_K cover the rounding of the bound's own arithmetic. `SLACK` covers inputs
that the bfloat16 units flush to zero.

The bfloat16 weight is handed to oneDNN once, in its own blocked layout (`_prepack`): the plain
call reorders the whole weight on every step. Measured on 2 cores, [64 x 256] x [256 x 32000]:
0.8-0.9 against 1.8 ms in a loop, and 2.2-2.45 against 2.6-2.7 ms inside decode steps (calls
alternated in one run). From 512 rows the prepacked call is slower (8.3 against 5.5 ms), so
larger batches go through it in slices of `PACKED_MAX_ROWS`. Where torch lacks the oneDNN ops,
the plain call is used.

Used for all-greedy batches without logprobs, penalties or constraints (the model runner
decides); LLMSERVE_CPU_GREEDY_SCREEN=0 turns it off. It costs a bfloat16 copy of the LM head
(half the float32 weight) and is set up only where the CPU multiplies bfloat16 natively.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmserve.kernels import cpu_fused, cpu_native

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu") / "greedy_screen.c"
ENV_SWITCH = "LLMSERVE_CPU_GREEDY_SCREEN"
_SYMBOL = "llmserve_screen_argmax_bf16"
_P, _I = ctypes.c_void_p, ctypes.c_int64
# (out, approx, approx row stride, hidden, hidden row stride, weight, wnorm, max wnorm, c, slack,
#  rows, vocab, dim, max candidates)
_ARGTYPES = [_P, _P, _I, _P, _I, _P, _P, ctypes.c_float, ctypes.c_double, ctypes.c_float,
             _I, _I, _I, _I]

UNIT_ROUNDOFF = 2.0**-8  # bfloat16: 8 significant bits, round to nearest
SLACK = 1e-20  # absolute: products of values the bfloat16 units flush to zero (< 2^-126 each)
MAX_CANDIDATES = 128  # more than this many possible winners: the row takes the float32 path
MAX_VOCAB = 4096 * 256  # the C scan's per-thread block array (MAX_VOCAB in greedy_screen.c)
PACKED_MAX_ROWS = 256  # rows per call of the prepacked GEMM (slower than the plain one at 512)


def error_factor(dim: int) -> float:
    """c of the bound |approx - exact| <= c ||h|| ||w_j|| for a dot product of `dim` terms."""
    u, f32 = UNIT_ROUNDOFF, dim * 2.0**-24
    gamma = f32 / (1.0 - f32)
    return (3 * u + 3 * u * u + u**3 + 2 * gamma) * (1 + 2.0**-10)


def _prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a bfloat16 [vocab, dim] weight for `_linear_pointwise`, or None
    where this torch cannot make or use one (the plain GEMM is used then)."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        packed = ops._reorder_linear_weight(weight, PACKED_MAX_ROWS)
        probe = torch.zeros(1, weight.shape[1], dtype=torch.bfloat16)
        ops._linear_pointwise(probe, packed, None, "none", [], "")
    except (AttributeError, RuntimeError) as exc:
        logger.info("oneDNN prepacked bfloat16 GEMM unavailable (%s); the screen reorders the "
                    "LM head per call", exc)
        return None
    return packed


@functools.cache
def load() -> Any | None:
    """The ctypes screen function, or None when it cannot be used here (reason logged once)."""
    fns = cpu_native.load_functions(SOURCE, {_SYMBOL: (_ARGTYPES, _I)}, "CPU greedy screen")
    return fns[0] if fns else None


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16): elsewhere oneDNN
    emulates it and the bfloat16 GEMM is no faster than the float32 one."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported",
                                                     "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)


def blocker(weight: torch.Tensor) -> str | None:
    """Why a GreedyHead cannot be built for this LM head weight here (None when it can)."""
    if cpu_native.switched_off(ENV_SWITCH):
        return f"switched off by {ENV_SWITCH}"
    if weight.dim() != 2 or weight.dtype != torch.float32 or not weight.is_cpu:
        return "the LM head is not a 2-d float32 CPU weight"
    if not weight.shape[0] or not weight.shape[1]:
        return "the LM head is empty"
    if weight.shape[0] > MAX_VOCAB:
        return f"a vocabulary of {weight.shape[0]} rows is above the screen's {MAX_VOCAB}"
    if not native_bf16():
        return "the CPU has no native bfloat16 multiply (AMX or AVX512-BF16)"
    if load() is None:
        return "the native screen is not available"
    return None


class GreedyHead:
    """`argmax(F.linear(h, weight), -1)` for float32 CPU rows, from a bfloat16 GEMM and a few
    exact dot products.

    `full_logits(h)` computes float32 logits the usual way; rows the screen cannot decide use it.
    Raises ValueError for a weight with non-finite values (the bound would not hold). Callers
    use it for every all-greedy batch, however small: with the bfloat16 weight prepacked, even
    one row is faster than the float32 head's GEMV, which reads twice the bytes (decode steps of
    the small Qwen3 in whole 256-token runs, rounds alternated, 2 cores: 1.99 against 2.16 ms at
    1 sequence, 2.30 against 2.45 at 2, 2.70 against 2.82 at 4).
    """

    def __init__(self, weight: torch.Tensor,
                 full_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        reason = blocker(weight)
        if reason is not None:
            raise ValueError(f"no greedy screen: {reason}")
        weight = weight.detach()
        norms = weight.double().norm(dim=1)
        if not bool(torch.isfinite(norms).all()):
            raise ValueError("the LM head has non-finite values")
        wnorm = norms.float()
        # Rounded up, so that each float32 norm still bounds the exact one.
        wnorm = torch.where(wnorm.double() < norms, torch.nextafter(wnorm, torch.tensor(torch.inf)),
                            wnorm)
        self.weight = weight.contiguous()
        self.vocab, self.dim = self.weight.shape
        self.wnorm = wnorm.contiguous()
        self.max_wnorm = float(self.wnorm.max())
        bf16 = self.weight.to(torch.bfloat16)
        self.packed = _prepack(bf16)
        # The plain copy is kept only when there is no packed one (it is as large).
        self.weight_bf16: torch.Tensor | None = bf16 if self.packed is None else None
        self.c = error_factor(self.dim)
        self.full_logits = full_logits
        self._screen = load()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy token (int64) of each row of `hidden` ([rows, dim] float32 CPU)."""
        if (hidden.dim() != 2 or hidden.shape[1] != self.dim or hidden.dtype != torch.float32
                or not hidden.is_cpu):
            raise ValueError(f"expected float32 CPU rows of {self.dim}, got "
                             f"{tuple(hidden.shape)} {hidden.dtype} on {hidden.device}")
        if hidden.stride(1) != 1:
            hidden = hidden.contiguous()
        rows = hidden.shape[0]
        out = torch.empty(rows, dtype=torch.int64)
        if not rows:
            return out
        approx = self.approx_logits(hidden.to(torch.bfloat16))
        if approx.stride(1) != 1:
            approx = approx.contiguous()
        undecided = self._screen(
            out.data_ptr(), approx.data_ptr(), approx.stride(0), hidden.data_ptr(),
            hidden.stride(0), self.weight.data_ptr(), self.wnorm.data_ptr(), self.max_wnorm,
            self.c, SLACK, rows, self.vocab, self.dim, MAX_CANDIDATES)
        if undecided:
            rows_left = (out < 0).nonzero().flatten()
            logits = self.full_logits(hidden.index_select(0, rows_left)).float().contiguous()
            out.index_copy_(0, rows_left, cpu_fused.row_argmax(logits))
        return out

    def approx_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The bfloat16 logits of bfloat16 rows: one oneDNN GEMM per `PACKED_MAX_ROWS` rows with
        the prepacked weight, else one plain GEMM."""
        if self.packed is None:
            return F.linear(hidden, self.weight_bf16)
        slices = [torch.ops.mkldnn._linear_pointwise(hidden[i:i + PACKED_MAX_ROWS], self.packed,
                                                     None, "none", [], "")
                  for i in range(0, hidden.shape[0], PACKED_MAX_ROWS)]
        return slices[0] if len(slices) == 1 else torch.cat(slices)
