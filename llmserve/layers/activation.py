"""Activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.kernels import ops


class SiluAndMul(nn.Module):
    """SiLU(gate) * up over a fused gate/up projection of width 2 * intermediate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class GeluAndMul(nn.Module):
    """GELU(gate) * up over a fused gate/up projection (Gemma's MLP).

    `approximate="tanh"` is Hugging Face's `gelu_pytorch_tanh`, "none" its exact `gelu`. Plain
    torch on every device: two element-wise kernels, the same ops transformers runs.
    """

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up
