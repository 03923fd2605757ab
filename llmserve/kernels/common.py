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


def fast_launch_enabled() -> bool:
    """Whether `StepLaunch` may relaunch a compiled kernel directly (LLMSERVE_TRITON_FAST_LAUNCH).

    Off under the interpreter (no compiled kernel) and on Triton releases older than 3.6, whose
    compiled-kernel launcher was not checked against this code.
    """
    if not HAS_TRITON or interpreting():
        return False
    if os.environ.get("LLMSERVE_TRITON_FAST_LAUNCH", "1").lower() in ("0", "false", "off", "no"):
        return False
    return _triton_at_least(3, 6)


@functools.cache
def _triton_at_least(major: int, minor: int) -> bool:
    import triton

    parts = triton.__version__.split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):  # an unusual version string: take the checked path
        return False


class StepLaunch:
    """One Triton kernel with a fixed grid, constexprs and launch options, launched many times.

    The first launch, and any launch whose `key` differs from the last compiled one, goes
    through Triton's JIT entry point (argument binding, specialisation, cache lookup). Later
    launches with the same key call the compiled kernel's own launcher with the same argument
    list Triton would pass, which skips that bookkeeping: the host cost of one launch drops to
    the driver call. The caller's `key` must change whenever Triton could specialise the
    kernel differently: the dtype and 16-byte alignment of every pointer and the value of
    every integer argument that may change between calls (arguments that stay fixed for this
    object's lifetime need not be in it). A key of None always takes the JIT path. Positional
    `args` must be the kernel's non-constexpr parameters in order, followed in the signature by
    the constexprs given here; `grid` has three entries.
    """

    __slots__ = ("fn", "grid", "constexprs", "options", "_key", "_runner", "_tail")

    def __init__(self, fn, grid: tuple[int, ...], constexprs: dict, **options: int) -> None:
        self.fn, self.grid, self.constexprs, self.options = fn, grid, constexprs, options
        self._key: object = None
        self._runner = None
        self._tail: tuple = ()

    def __call__(self, key: object, *args: object) -> None:
        runner = self._runner
        if runner is not None and key == self._key:
            runner(*args, *self._tail)
            return
        compiled = self.fn[self.grid](*args, **self.constexprs, **self.options)
        self._runner = None
        if key is None or not fast_launch_enabled():
            return
        if hasattr(compiled, "run") and hasattr(compiled, "function"):
            names = list(self.fn.arg_names)
            tail = names[len(args):]
            # Triton passes every bound parameter, constexprs included, to the launcher.
            if sorted(tail) == sorted(self.constexprs) and len(names) == len(args) + len(tail):
                self._tail = tuple(self.constexprs[name] for name in tail)
                self._runner = compiled[self.grid]
                self._key = key


def launch_key(*tensors: torch.Tensor) -> tuple | None:
    """A `StepLaunch` key for kernels whose only per-call arguments are these tensors and their
    strides: their dtypes, shapes and strides, or None if any is not 16-byte aligned (then
    which one it is would matter to Triton's specialisation, and the JIT path decides)."""
    ptrs = 0
    for t in tensors:
        ptrs |= t.data_ptr()
    if ptrs & 15:
        return None
    return tuple((t.dtype, t.shape, t.stride()) for t in tensors)
