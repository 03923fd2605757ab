"""Rotary position embedding: cos/sin cache construction (default and llama3 scaling)."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmserve.kernels import ops, ref
from llmserve.kernels.common import triton_enabled

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def _inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling (long wavelengths slowed by `factor`)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_parameters(hf_config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a config, across transformers 4.x and 5.x layouts."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or None
    theta = hf_config.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return float(theta), scaling


def layer_type_rope_parameters(
    hf_config: dict, layer_type: str, default_theta: float, legacy_theta_key: str = "rope_theta"
) -> tuple[float, dict | None]:
    """(rope_theta, scaling or None) for one layer type of a model whose layer types have their
    own rope (Gemma 3: "sliding_attention" / "full_attention").

    transformers 5 nests them: ``rope_parameters = {layer_type: {rope_type, rope_theta, ...}}``.
    Older configs are flat: the layer type's theta under `legacy_theta_key` (Gemma 3's local
    layers: ``rope_local_base_freq``), and ``rope_scaling`` for full-attention layers only.
    """
    params = hf_config.get("rope_parameters")
    nested = params.get(layer_type) if isinstance(params, dict) else None
    if isinstance(nested, dict):
        scaling = nested if nested.get("rope_type", "default") != "default" else None
        return float(nested.get("rope_theta", default_theta)), scaling
    theta = float(hf_config.get(legacy_theta_key) or default_theta)
    if layer_type != "full_attention":
        return theta, None
    return theta, hf_config.get("rope_scaling") or None


class RotaryEmbedding(nn.Module):
    """Applies neox-style rotary embedding to q and k at the given positions.

    Off CUDA, the cos/sin rows of a step are gathered once and shared by every layer with the
    same rope (each layer has its own module, but all receive the same `positions` tensor).
    """

    # (positions, rope key, cos2, sin2) of the latest step; holding `positions` keeps its
    # identity from being reused by a later tensor.
    _step_rows: tuple = (None, None, None, None)

    def __init__(
        self, head_dim: int, max_position: int, base: float, scaling: dict | None = None
    ) -> None:
        super().__init__()
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope scaling {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        inv_freq = _inv_freq(head_dim, base)
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, head_dim]
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._rope_key = (head_dim, max_position, base, repr(scaling))

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if triton_enabled(q):
            return ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
        cos2, sin2 = self._rows(positions)
        return ref.rotate_neox(q, cos2, sin2), ref.rotate_neox(k, cos2, sin2)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate one [T, heads, head_dim] tensor (q and k stacked, off CUDA)."""
        cos2, sin2 = self._rows(positions)
        return ref.rotate_neox(x, cos2, sin2)

    def _rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        held, key, cos2, sin2 = RotaryEmbedding._step_rows
        if held is positions and key == self._rope_key and cos2.device == positions.device:
            return cos2, sin2
        cos2, sin2 = ref.rotary_rows(self.cos_sin_cache, positions)
        RotaryEmbedding._step_rows = (positions, self._rope_key, cos2, sin2)
        return cos2, sin2
