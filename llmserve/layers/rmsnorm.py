"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored zero-centred and scales by (1 + weight).

    Normalised and scaled in float32, then cast back, as Hugging Face's Gemma 3 does (Llama
    casts before the weight multiply; Gemma after). No fused residual: Gemma adds the residual
    after its post-norms, outside the norm.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        # F.rms_norm without a weight is x * rsqrt(mean(x^2) + eps), one fused op.
        out = F.rms_norm(h, (h.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())
        return out.to(x.dtype)
