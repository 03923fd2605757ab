"""Shared helpers for the Triton kernels: availability checks and launch-size arithmetic."""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: the torch twins in `ref.py` are the CPU path.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_enabled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled Triton kernels should handle these tensors (CUDA and Triton present)."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise a clear ValueError when a Triton kernel cannot run on these tensors."""
    if not HAS_TRITON:
        raise ValueError("the Triton kernels need the 'triton' package (pip install triton)")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not tensors[0].is_cuda and not interpreting():
        raise ValueError(
            "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on CPU)"
        )


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; a nominal 132 (one H100/H200) elsewhere."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 132


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
