"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from llmserve.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (norm(x + residual), x + residual); the second is None without a residual."""
        return ops.rms_norm(x, self.weight, self.eps, residual)
