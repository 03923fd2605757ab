"""A decode step of the fused CPU forward in one native call (`cpu/decode_forward.c`).

The fused forward (`llmserve.models.cpu_fast_path`) walks the layers in Python, one ctypes or
torch call per op. For a step whose rows are all decodes, `DecodeForward` makes that walk one C
call: the driver calls the same kernels (the fused element-wise ops, the paged decode attention,
MKL's GEMMs as F.linear and `cpu_packed_gemm` reach them) in the same order, so the hidden states
are bit-for-bit the Python walk's (measured gains: `models/cpu_fast_path.py`). For other steps
(prefills, mixed) it runs the parts of each layer before and after attention, each thread taking
whole chunks of rows through them (`DecodeForward.qkv`, `.post_attention`), again with the walk's
bits where the layer's GEMMs have MKL-packed copies.

It needs the fused ops, the native decode kernel and MKL's `sgemm_` in torch (x86 builds of
torch have it); `load()` returns None otherwise, or with LLMSERVE_CPU_DECODE_DRIVER=0, and the
Python walk runs. Built and cached like the other native kernels (`cpu_native`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmserve.kernels import cpu_fused, cpu_native, cpu_packed_gemm

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu") / "decode_forward.c"
ENV_SWITCH = "LLMSERVE_CPU_DECODE_DRIVER"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_ERRORS = {
    -10: "an input token id is outside the embedding",
    -11: "a position is beyond the rotary cache",
    -12: "a slot is outside the paged cache",
}
_NO_MEMORY = -13
_SIGNATURES = {
    "llmserve_decode_forward_f32": ([_P, _P], ctypes.c_int),
    # (model, layer, hidden or NULL, residual, positions, rows, chunk, qkv out)
    "llmserve_rows_qkv_f32": ([_P, _I, _P, _P, _P, _I, _I, _P], ctypes.c_int),
    # (model, layer, attention output, residual, rows, chunk, out)
    "llmserve_rows_post_attention_f32": ([_P, _I, _P, _P, _I, _I, _P], ctypes.c_int),
}


class _Linear(ctypes.Structure):
    _fields_ = [("weight", _P), ("packed", _P), ("bias", _P), ("n", _I), ("k", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P),
                ("cos_sin", _P), ("max_position", _I), ("k_cache", _P), ("v_cache", _P),
                ("window", _I), ("scale", _F), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [("norm", _P), ("rope", _P), ("silu_and_mul", _P), ("store", _P), ("attend", _P),
                ("sgemm", _P), ("sgemm_compute", _P), ("embed", _P), ("final_norm", _P),
                ("layers", ctypes.POINTER(_Layer)), ("num_layers", _I), ("vocab", _I),
                ("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I),
                ("num_blocks", _I), ("block_size", _I), ("min_packed_rows", _I),
                ("max_packed_rows", _I), ("eps", _F)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _I), ("input_ids", _P), ("positions", _P), ("slots", _P),
                ("block_tables", _P), ("table_elem_size", _I), ("table_width", _I),
                ("seq_lens", _P), ("row_index", _P), ("scratch", _P), ("out", _P), ("chunk", _I)]


def _address(fn: Any) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


@dataclass(frozen=True)
class DriverFunctions:
    """The driver's entry points (ctypes, argument types set)."""

    decode: Any
    rows_qkv: Any
    rows_post_attention: Any


@functools.cache
def load() -> DriverFunctions | None:
    """The driver's functions, or None when they cannot run here (reason logged once)."""
    if cpu_native.switched_off(ENV_SWITCH):
        logger.info("native decode driver disabled by %s", ENV_SWITCH)
        return None
    mkl = cpu_packed_gemm._mkl()
    if mkl is None or not hasattr(mkl, "sgemm_") or cpu_fused.load() is None or cpu_native.load() is None:
        logger.info("native decode driver needs MKL's sgemm_ in torch and the fused and decode "
                    "kernels; decode steps walk the layers in Python")
        return None
    fns = cpu_native.load_functions(SOURCE, _SIGNATURES, "native decode driver")
    return DriverFunctions(*fns) if fns else None


@dataclass
class LayerWeights:
    """What the driver reads of one decoder layer (the caller keeps the tensors alive)."""

    in_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    cos_sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    window: int | None
    scale: float
    # (weight, packed copy or None, bias or None) of each linear layer
    qkv: tuple[torch.Tensor, Any, torch.Tensor | None]
    o: tuple[torch.Tensor, Any, torch.Tensor | None]
    gate_up: tuple[torch.Tensor, Any, torch.Tensor | None]
    down: tuple[torch.Tensor, Any, torch.Tensor | None]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(spec: tuple[torch.Tensor, Any, torch.Tensor | None]) -> _Linear:
    weight, packed, bias = spec
    return _Linear(weight.data_ptr(), None if packed is None else packed.buffer.data_ptr(),
                   _ptr(bias), weight.shape[0], weight.shape[1])


class DecodeForward:
    """One model's layers as the driver reads them: `__call__` runs a decode step; `qkv` and
    `post_attention` run the parts of a prefill layer before and after attention, rows spread
    over the threads in chunks (see decode_forward.c)."""

    def __init__(self, fns: DriverFunctions, embed: torch.Tensor, final_norm: torch.Tensor, eps: float,
                 heads: int, kv_heads: int, head_dim: int, layers: Sequence[LayerWeights]) -> None:
        ops, mkl = cpu_fused.load(), cpu_packed_gemm._mkl()
        nb, bs = layers[0].k_cache.shape[:2]
        self.fns = fns
        self._tensors = layers  # the pointers below stay valid while these live
        self._layers = (_Layer * len(layers))(*[
            _Layer(lw.in_norm.data_ptr(), lw.post_norm.data_ptr(), _ptr(lw.q_norm), _ptr(lw.k_norm),
                   lw.cos_sin.data_ptr(), lw.cos_sin.shape[0], lw.k_cache.data_ptr(),
                   lw.v_cache.data_ptr(), lw.window or 0, lw.scale, _linear(lw.qkv), _linear(lw.o),
                   _linear(lw.gate_up), _linear(lw.down))
            for lw in layers])
        self.model = _Model(
            _address(ops.add_rms_norm), _address(ops.qk_norm_rope), _address(ops.silu_and_mul),
            _address(ops.store_kv), _address(cpu_native.load()), _address(mkl.sgemm_),
            _address(mkl.cblas_sgemm_compute), embed.data_ptr(), final_norm.data_ptr(),
            self._layers, len(layers), embed.shape[0], embed.shape[1], heads, kv_heads, head_dim,
            nb, bs, cpu_packed_gemm.MIN_ROWS, cpu_packed_gemm.MAX_ROWS, eps)
        self.embed, self.final_norm = embed, final_norm
        self.hidden = embed.shape[1]
        self.qkv_width = (heads + 2 * kv_heads) * head_dim
        self.q_size = heads * head_dim
        self.inter = max(lw.gate_up[0].shape[0] for lw in layers)
        self.cache_ptr = layers[0].k_cache.data_ptr()
        self._scratch = torch.empty(0)

    def scratch_floats(self, rows: int) -> int:
        """Floats of scratch for `rows` rows (the layout is in decode_forward.c)."""
        return rows * (3 * self.hidden + self.qkv_width + self.q_size + self.inter + self.inter // 2)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 batch: cpu_native.DecodeBatch, chunk: int = 0) -> torch.Tensor:
        """Final normed hidden states [rows, hidden] of a step of `rows` decode rows, row i of
        sequence i. int64 contiguous ids, positions and slots; `batch` as `cpu_native` builds it.
        `chunk` > 0 runs the parts of each layer around attention as `qkv` and `post_attention`
        do, in chunks of that many rows (same bits where the GEMMs are packed); 0, op by op."""
        rows = input_ids.shape[0]
        need = self.scratch_floats(rows)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32)
        out = torch.empty(rows, self.hidden, dtype=torch.float32)
        table, elem, width, lens, row_index, _, _ = batch.step_args
        step = _Step(rows, input_ids.data_ptr(), positions.data_ptr(), slots.data_ptr(), table,
                     elem, width, lens, row_index, self._scratch.data_ptr(), out.data_ptr(), chunk)
        status = self.fns.decode(ctypes.byref(self.model), ctypes.byref(step))
        _raise_for(status, cpu_native.decode_error)  # else the attention kernel's own status
        return out

    def qkv(self, layer: int, hidden: torch.Tensor | None, residual: torch.Tensor,
            positions: torch.Tensor, chunk: int) -> torch.Tensor:
        """[rows, qkv width]: q/k norm and rotary applied to layer `layer`'s qkv projection of
        norm(hidden + residual), the sum stored into `residual` (norm(residual) alone when
        `hidden` is None). Contiguous float32 rows; `positions` contiguous int64."""
        rows = residual.shape[0]
        _check_rows(residual, rows, self.hidden)
        if hidden is not None:
            _check_rows(hidden, rows, self.hidden)
        if positions.dtype != torch.int64 or not positions.is_contiguous() or positions.shape != (rows,):
            raise ValueError("positions must be contiguous int64, one per row")
        out = torch.empty(rows, self.qkv_width, dtype=torch.float32)
        status = self.fns.rows_qkv(ctypes.byref(self.model), layer, _ptr(hidden),
                                   residual.data_ptr(), positions.data_ptr(), rows, chunk,
                                   out.data_ptr())
        _raise_for(status, _unknown_status)
        return out

    def post_attention(self, layer: int, attn: torch.Tensor, residual: torch.Tensor,
                       chunk: int) -> torch.Tensor:
        """[rows, hidden]: down(SiLU(gate) * up) of norm(o_proj(attn) + residual) of layer
        `layer`, the sum stored into `residual`. Contiguous float32 rows."""
        rows = residual.shape[0]
        _check_rows(residual, rows, self.hidden)
        _check_rows(attn, rows, self.q_size)
        out = torch.empty(rows, self.hidden, dtype=torch.float32)
        status = self.fns.rows_post_attention(ctypes.byref(self.model), layer, attn.data_ptr(),
                                              residual.data_ptr(), rows, chunk, out.data_ptr())
        _raise_for(status, _unknown_status)
        return out


def _check_rows(t: torch.Tensor, rows: int, width: int) -> None:
    if t.shape != (rows, width) or t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"expected contiguous float32 rows of shape {(rows, width)}, got "
                         f"{tuple(t.shape)} {t.dtype}")


def _raise_for(status: int, other: Callable[[int], Exception]) -> None:
    """Raise the error a driver call's nonzero status stands for; `other(status)` for a status
    the driver does not define itself."""
    if not status:
        return
    if status in _ERRORS:
        raise IndexError(_ERRORS[status])
    if status == _NO_MEMORY:
        raise MemoryError("native CPU driver: scratch could not be allocated")
    raise other(status)


def _unknown_status(status: int) -> Exception:
    return RuntimeError(f"native CPU driver: status {status}")
