"""Activations."""

from __future__ import annotations

import torch
from torch import nn

from llmserve.kernels import ops


class SiluAndMul(nn.Module):
    """SiLU(gate) * up over a fused gate/up projection of width 2 * intermediate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)
