"""The fused CPU forward of the Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in fp32.

Eager PyTorch on CPU pays a few microseconds of dispatch per op, and a decoder layer is a few
dozen small ops: at decode sizes that, not arithmetic, is the step time. This forward keeps the
matmuls in torch (threaded GEMM) and the attention in its backend (native paged decode), and
does everything between them in one C call each (`llmserve.kernels.cpu_fused`): RMSNorm with the
residual add, q/k norm with rotary, SiLU-and-mul. It also walks the layers directly rather than
through nn.Module calls. It was chosen over torch.compile (inductor) by measurement on the small
Qwen3 of benchmarks/cpu_decode_latency.py: compiling each layer's non-attention blocks (dynamic
batch) cost more CPU per forward than even eager, and 3 minutes to compile cold on a busy 2-core
machine, where these C kernels build in under a second and are cached like the decode kernel.

Steps whose rows are all decodes go further: the native driver (`cpu_decode_forward`) walks the
layers in one C call, with the same kernels in the same order, so the hidden states are bit for
bit the Python walk's. Measured in whole 256-token runs, rounds alternated, 2 cores: decode steps
of 1 sequence 2.14 -> 1.47 ms, of 16 sequences 4.38 -> 3.17 ms, of 64 sequences 8.80 -> 7.37 ms
(LLMSERVE_CPU_DECODE_DRIVER=0 keeps the Python walk).

Other steps (prefills, mixed) use the same driver for the parts of each layer around attention:
the input norm, qkv and rotary; o_proj, the post-attention norm and the MLP. Each thread runs
that whole chain on chunks of rows (`chunk_rows`) instead of every op being split over the
threads with a barrier after it, with the same bits. Measured on 2 cores, one layer of an
8,192-row prefill step: 11.2 -> 6.2 ms before attention, 47.5 -> 44 ms after it (and 1.08 ->
0.80 and 6.3 -> 5.7 ms at 1,024 rows, 0.44 -> 0.19 and 1.81 -> 1.29 ms at 200).

`optimize_for_cpu(model, eager=...)` switches a loaded model to it when it applies; eager stays
available through `eager=True` (the engine's `enforce_eager`) or LLMSERVE_CPU_FAST_PATH=0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.attention.backends import torch_attention
from llmserve.attention.metadata import AttentionMetadata, get_attention_metadata
from llmserve.kernels import (
    cpu_attention,
    cpu_decode_forward,
    cpu_fused,
    cpu_greedy,
    cpu_native,
    cpu_packed_gemm,
)
from llmserve.kernels.cpu_decode_forward import DecodeForward, LayerWeights
from llmserve.kernels.cpu_packed_gemm import PackedLinear

logger = logging.getLogger(__name__)
linear = cpu_packed_gemm.linear

ENV_SWITCH = "LLMSERVE_CPU_FAST_PATH"
# The layer GEMMs with MKL-packed copies (`_Layer.<name>_p`), largest first (`pack_weights`).
PACKED_GEMMS = ("gate_up", "down", "qkv", "o")
# Rows per slice of a prefill step's layer work outside attention, walked in Python without the
# native driver (`_in_slices`).
SLICE_ROWS = 1024
# Rows per chunk of that work in the native driver (`chunk_rows`).
CHUNK_ROWS = 128
# Decode steps of this many rows or more run it in chunks too, one per thread (each thread then
# reads every weight): measured in whole runs on 2 cores, steps of 64 sequences 4.19 -> 3.25 ms,
# of 32 (900-token contexts) 4.92 -> 4.45, of 16 1.26 -> 1.12; of 8 and 4 slower (0.79 -> 0.94,
# 0.63 -> 0.75 ms).
DECODE_CHUNK_MIN_ROWS = 16


@dataclass
class _Layer:
    """One decoder layer's weights as the fused forward reads them."""

    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    cos_sin: torch.Tensor
    attn: nn.Module
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    gate_up_w: torch.Tensor
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    # MKL-packed copies for decode-sized calls (`cpu_packed_gemm`), where the budget allowed.
    qkv_p: PackedLinear | None = None
    o_p: PackedLinear | None = None
    gate_up_p: PackedLinear | None = None
    down_p: PackedLinear | None = None

    # The driver's row chunks keep the walk's bits through MKL's packed copies only (its plain
    # GEMM's sums depend on the rows of the call), so a part whose GEMMs are not all packed keeps
    # the walk.
    @property
    def qkv_packed(self) -> bool:
        return self.qkv_p is not None

    @property
    def post_attention_packed(self) -> bool:
        return None not in (self.o_p, self.gate_up_p, self.down_p)


class FusedCPUForward:
    """`LlamaModel.forward` with the element-wise ops fused (fp32, CPU, one rank).

    Not an nn.Module on purpose: it holds references to the model's own weights and attention
    layers, and must not show up in `model.modules()` or the state dict a second time.
    """

    def __init__(self, model: nn.Module, ops: cpu_fused.FusedOps) -> None:
        self.ops = ops
        self.embed_w = model.embed_tokens.weight
        self.final_norm = model.norm.weight
        self.eps = float(model.norm.eps)
        first = model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.q_size, self.kv_size = first.q_size, first.kv_size
        self.layers = [self._layer(layer) for layer in model.layers]
        # The native driver (all-decode steps, and the row-parallel parts of other steps):
        # built at the first step (the KV cache and the packed weights exist by then), again
        # when the cache is reallocated.
        self._driver_fns = cpu_decode_forward.load()
        self._driver: DecodeForward | None = None

    @staticmethod
    def _layer(layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(
            in_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
            qkv_w=attn.qkv_proj.weight, qkv_b=attn.qkv_proj.bias,
            q_norm=attn.q_norm.weight if attn.qk_norm else None,
            k_norm=attn.k_norm.weight if attn.qk_norm else None,
            cos_sin=attn.rotary_emb.cos_sin_cache, attn=attn.attn,
            o_w=attn.o_proj.weight, o_b=attn.o_proj.bias,
            gate_up_w=mlp.gate_up_proj.weight, gate_up_b=mlp.gate_up_proj.bias,
            down_w=mlp.down_proj.weight, down_b=mlp.down_proj.bias,
        )

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """norm(x + residual) * weight; the sum goes into `residual` in place."""
        rows, dim = x.shape
        out = torch.empty(rows, dim, dtype=torch.float32)
        res_ptr = residual.data_ptr() if residual is not None else None
        res_stride = residual.stride(0) if residual is not None else 0
        self.ops.add_rms_norm(
            out.data_ptr(), dim, res_ptr, res_stride, x.data_ptr(), x.stride(0), res_ptr,
            res_stride, weight.data_ptr(), rows, dim, self.eps,
        )
        return out

    def _qkv(self, hidden: torch.Tensor | None, residual: torch.Tensor, layer: _Layer,
             pos: torch.Tensor) -> torch.Tensor:
        """The fused q/k/v rows of `layer`, q/k norm and rotary applied, from norm(hidden +
        residual) (the sum going into `residual` in place; the first layer norms the residual
        alone, `hidden` None), in slices (`_in_slices`): 8,192-token prefill steps 292 -> 285 ms
        (median of 16, alternated step by step)."""
        return _in_slices(self._qkv_rows, layer, layer.qkv_w.shape[0], hidden, residual, pos)

    def _qkv_rows(self, layer: _Layer, hidden: torch.Tensor | None, residual: torch.Tensor,
                  pos: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        h = self._norm(residual if hidden is None else hidden,
                       None if hidden is None else residual, layer.in_norm)
        qkv = linear(h, layer.qkv_w, layer.qkv_b, layer.qkv_p, out)
        status = self.ops.qk_norm_rope(
            qkv.data_ptr(), qkv.stride(0), qkv.shape[0], self.heads, self.kv_heads, self.head_dim,
            layer.q_norm.data_ptr() if layer.q_norm is not None else None,
            layer.k_norm.data_ptr() if layer.k_norm is not None else None, self.eps,
            layer.cos_sin.data_ptr(), layer.cos_sin.shape[0], pos.data_ptr(),
        )
        if status:
            raise IndexError(f"a position is beyond the rotary cache ({layer.cos_sin.shape[0]} rows)")
        return qkv

    def _post_attention(self, attn: torch.Tensor, residual: torch.Tensor, layer: _Layer
                        ) -> torch.Tensor:
        """down(SiLU(gate) * up) of norm(o_proj(attn) + residual), the sum going into `residual`
        in place, in slices (`_in_slices`): a prefill step's gate/up output (64 MiB at 8,192
        rows and width 2,048) and the norm's operands then stay in cache from one op to the
        next. Measured on 2 cores: 55 -> 50 ms per MLP alone with the MLP sliced; slicing o_proj
        and the norm with it took prefill steps of 8,192 tokens from 321 to 313 ms (median of
        16, alternated step by step)."""
        return _in_slices(self._post_attention_rows, layer, layer.down_w.shape[0], attn, residual)

    def _post_attention_rows(self, layer: _Layer, attn: torch.Tensor, residual: torch.Tensor,
                             out: torch.Tensor | None = None) -> torch.Tensor:
        h = self._norm(linear(attn, layer.o_w, layer.o_b, layer.o_p), residual, layer.post_norm)
        rows = h.shape[0]
        gate_up = linear(h, layer.gate_up_w, layer.gate_up_b, layer.gate_up_p)
        act = torch.empty(rows, gate_up.shape[1] // 2, dtype=torch.float32)
        self.ops.silu_and_mul(act.data_ptr(), gate_up.data_ptr(), gate_up.stride(0), rows, act.shape[1])
        return linear(act, layer.down_w, layer.down_b, layer.down_p, out)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states of every row, or of the step's `AttentionMetadata.output_rows`
        only when the runner set them: then the last layer stores every row's k and v but runs
        attention, o_proj and the MLP for those rows alone (a prefill step samples one row per
        sequence, so that is most of the last layer's work)."""
        meta = get_attention_metadata()
        if self._driver_fns is not None and meta.num_decode_tokens == input_ids.shape[0]:
            hidden = self._native_decode(input_ids, positions, meta)
            if hidden is not None:
                return hidden
        driver = self._driver_for_cache() if self._driver_fns is not None else None
        # F.embedding returns a new tensor: it becomes the residual stream, updated in place.
        residual = F.embedding(input_ids, self.embed_w)
        # Held in a local for the whole forward: the kernels read it through a raw pointer.
        pos = (positions if positions.dtype == torch.int64 else positions.long()).contiguous()
        output_rows = meta.output_rows
        last = len(self.layers) - 1
        hidden = None
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        for index, layer in enumerate(self.layers):
            if driver is not None and layer.qkv_packed:
                qkv = driver.qkv(index, hidden, residual, pos, chunk_rows(len(residual)))
            else:
                qkv = self._qkv(hidden, residual, layer, pos)
            q, k, v = qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:]
            if index == last and output_rows is not None:
                attn = layer.attn.forward_rows(q, k, v, output_rows)
                residual = residual.index_select(0, output_rows.tokens)
            else:
                attn = layer.attn(q, k, v)
            if driver is not None and layer.post_attention_packed:
                hidden = driver.post_attention(index, attn.contiguous(), residual,
                                               chunk_rows(len(residual)))
            else:
                hidden = self._post_attention(attn, residual, layer)
        return self._norm(hidden, residual, self.final_norm)

    def _native_decode(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       meta: AttentionMetadata) -> torch.Tensor | None:
        """The step's final hidden states from the native driver (`cpu_decode_forward`), or None
        when it cannot take this step (then the layers are walked here)."""
        rows = input_ids.shape[0]
        if not 0 < rows <= cpu_packed_gemm.MAX_ROWS or meta.output_rows is not None:
            return None
        driver = self._driver_for_cache()
        if driver is None:
            return None
        slots, keep = cpu_attention.prepare_slots(meta.slot_mapping)
        if keep is not None:  # padding rows: the per-layer store skips them
            return None
        batch = cpu_native.DecodeBatch.build(meta.block_tables, meta.seq_lens, meta.query_start_loc[:-1])
        ids = input_ids if input_ids.dtype == torch.int64 else input_ids.long()
        pos = positions if positions.dtype == torch.int64 else positions.long()
        chunk = chunk_rows(rows) if rows >= DECODE_CHUNK_MIN_ROWS and self._all_packed() else 0
        return driver(ids.contiguous(), pos.contiguous(), slots.contiguous(), batch, chunk)

    def _all_packed(self) -> bool:
        """Whether every layer GEMM has its MKL-packed copy (the chunked calls keep the
        op-by-op bits only then)."""
        return all(layer.qkv_packed and layer.post_attention_packed for layer in self.layers)

    def _driver_for_cache(self) -> DecodeForward | None:
        """The driver over the layers' current KV cache; None when a layer's attention is not
        the native paged path (another backend, a cache the kernel does not take)."""
        attns = [layer.attn for layer in self.layers]
        if any(a.backend is not torch_attention for a in attns):
            return None
        k0 = attns[0].k_cache
        if self._driver is not None and self._driver.cache_ptr == k0.data_ptr() and k0.numel():
            return self._driver
        self._driver = None
        shape = k0.shape
        if len(shape) != 4 or shape[2:] != (self.kv_heads, self.head_dim) or not all(
                c.dtype == torch.float32 and c.is_contiguous() and c.shape == shape
                for a in attns for c in (a.k_cache, a.v_cache)):
            return None
        self._driver = DecodeForward(
            self._driver_fns, self.embed_w, self.final_norm, self.eps, self.heads, self.kv_heads,
            self.head_dim, [self._weights(layer) for layer in self.layers])
        return self._driver

    @staticmethod
    def _weights(layer: _Layer) -> LayerWeights:
        attn = layer.attn
        return LayerWeights(
            in_norm=layer.in_norm, post_norm=layer.post_norm, q_norm=layer.q_norm,
            k_norm=layer.k_norm, cos_sin=layer.cos_sin, k_cache=attn.k_cache,
            v_cache=attn.v_cache, window=attn.sliding_window, scale=attn.scale,
            qkv=(layer.qkv_w, layer.qkv_p, layer.qkv_b), o=(layer.o_w, layer.o_p, layer.o_b),
            gate_up=(layer.gate_up_w, layer.gate_up_p, layer.gate_up_b),
            down=(layer.down_w, layer.down_p, layer.down_b))


def chunk_rows(rows: int) -> int:
    """Rows per chunk of the driver's row-parallel calls: CHUNK_ROWS, or fewer so that every
    thread gets a chunk (measured at 8,192 and 1,024 rows: 128 and 256 within noise, 64 and 512
    slower; at 32 and 200 rows, half the rows beat 128). Below MKL's packed-copy threshold, one
    chunk: the walk's plain GEMM over all the rows, whose bits a split would not keep."""
    if rows < cpu_packed_gemm.MIN_ROWS:
        return max(1, rows)
    return max(1, min(CHUNK_ROWS, -(-rows // torch.get_num_threads())))


def _in_slices(fn: Callable[..., torch.Tensor], layer: _Layer, width: int,
               *rows: torch.Tensor | None) -> torch.Tensor:
    """fn(layer, *rows), each of `rows` (row-aligned tensors, or None) cut into the same slices
    of SLICE_ROWS rows, fn writing each slice's [n, width] result into its rows of one output
    (its `out`: the last GEMM writes there directly, where copying the slices' own outputs in
    took ~3% of a prefill-heavy run). Views, so work that fn does in place on a slice (the
    residual's sums) lands in the whole tensor."""
    total = next(r for r in rows if r is not None).shape[0]
    if total <= SLICE_ROWS:
        return fn(layer, *rows)
    out = torch.empty(total, width, dtype=torch.float32)
    for start in range(0, total, SLICE_ROWS):
        end = start + SLICE_ROWS
        fn(layer, *(None if r is None else r[start:end] for r in rows), out=out[start:end])
    return out


def long_lived_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and buffers, with the copies the fast path made of them (packed
    GEMM weights, the greedy screen's bfloat16 LM head)."""
    tensors = [*model.parameters(), *model.buffers()]
    head = getattr(model, "lm_head", None)
    packed = [getattr(head, "packed", None)]
    fused = getattr(getattr(model, "model", None), "fused_forward", None)
    for layer in getattr(fused, "layers", []):
        packed += [getattr(layer, f"{name}_p") for name in PACKED_GEMMS]
    tensors += [p.buffer for p in packed if p is not None]
    greedy = getattr(head, "greedy", None)
    if greedy is not None:
        # (oneDNN's prepacked copy, `greedy.packed`, has no data pointer to advise.)
        tensors += [t for t in (greedy.weight_bf16, greedy.wnorm) if t is not None]
    return tensors


def fast_path_blocker(model: nn.Module) -> str | None:
    """Why the fused forward cannot run this model (None when it can)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not len(layers) or not hasattr(layers[0], "self_attn"):
        return f"{type(model).__name__} is not a Llama-family decoder"
    if not all(hasattr(layer.mlp, "gate_up_proj") for layer in layers):
        return "mixture-of-experts layers run the eager per-layer path"
    if not hasattr(layers[0].self_attn, "qk_norm"):  # e.g. Gemma 3: other norms, MLP and scale
        return f"{type(model).__name__} is not a Llama-family decoder"
    tensors = [t for t in model.parameters()] + [layers[0].self_attn.rotary_emb.cos_sin_cache]
    if any(t.device.type != "cpu" for t in tensors):
        return "the model is not on the CPU"
    if any(t.dtype != torch.float32 for t in tensors):
        return "the fused ops are float32 only"
    if getattr(inner.embed_tokens, "tp_size", 1) != 1:
        return "tensor parallelism runs the per-layer torch path"
    if layers[0].self_attn.head_dim % 2:
        return "rotary needs an even head_dim"
    if cpu_fused.load() is None:
        return "the fused CPU kernels are not available"
    return None


def optimize_for_cpu(model: nn.Module, eager: bool = False) -> bool:
    """Give a loaded Llama-family model the fused CPU forward when it can run it; return whether
    it now has it. `eager=True` (or LLMSERVE_CPU_FAST_PATH=0) puts the model back on the eager
    per-op forward. Anything else (CUDA, fp16/bf16, tensor parallelism, no C compiler) keeps the
    eager forward, with the reason logged."""
    inner = getattr(model, "model", None)
    if inner is None:
        return False
    inner.fused_forward = None
    if getattr(model, "lm_head", None) is not None:
        model.lm_head.packed = None
        model.lm_head.greedy = None
    if eager or cpu_native.switched_off(ENV_SWITCH):
        return False
    reason = fast_path_blocker(model)
    if reason is not None:
        if not any(p.is_cuda for p in model.parameters()):
            logger.info("fused CPU forward off: %s", reason)
        return False
    inner.fused_forward = FusedCPUForward(inner, cpu_fused.load())
    pack_weights(model, inner.fused_forward)
    add_greedy_head(model)
    return True


def add_greedy_head(model: nn.Module) -> bool:
    """Give the LM head a `cpu_greedy.GreedyHead` (exact greedy tokens from a bfloat16 GEMM)
    where this CPU multiplies bfloat16 natively; return whether it has one."""
    head = getattr(model, "lm_head", None)
    if head is None or getattr(head, "tp_size", 1) != 1:
        return False
    reason = cpu_greedy.blocker(head.weight)
    if reason is None:
        try:
            head.greedy = cpu_greedy.GreedyHead(head.weight, head)
        except ValueError as exc:
            reason = str(exc)
    if reason is not None:
        logger.info("greedy screen off: %s", reason)
    return head.greedy is not None


def pack_weights(model: nn.Module, fused: FusedCPUForward) -> int:
    """Give the LM head, then each layer's GEMMs (largest first), MKL-packed copies for decode
    steps, within the LLMSERVE_CPU_PACKED_WEIGHTS_MB budget (`cpu_packed_gemm`). Returns the
    number of weights packed."""
    budget = cpu_packed_gemm.budget_bytes()
    if not budget or not cpu_packed_gemm.available():
        return 0
    head = getattr(model, "lm_head", None)
    slots: list[tuple[object, str, torch.Tensor, torch.Tensor | None]] = []
    if head is not None and getattr(head, "tp_size", 1) == 1:
        slots.append((head, "packed", head.weight, None))
    for name in PACKED_GEMMS:
        slots += [(layer, f"{name}_p", getattr(layer, f"{name}_w"), getattr(layer, f"{name}_b"))
                  for layer in fused.layers]
    chosen = cpu_packed_gemm.plan([w for _, _, w, _ in slots], budget)
    for (owner, attr, weight, bias), pack in zip(slots, chosen):
        if pack:
            setattr(owner, attr, PackedLinear(weight, bias))
    logger.info("packed %d of %d CPU weights for decode GEMMs (budget %d MiB)",
                sum(chosen), len(slots), budget >> 20)
    return sum(chosen)
