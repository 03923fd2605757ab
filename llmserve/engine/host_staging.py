"""Host-to-device copies of a step's small arrays without allocating pinned memory per step.

On CUDA each named array is copied into a pinned buffer allocated once (grown when a step needs
more) and sent with a non-blocking copy. Two sets of buffers alternate: with async scheduling
the host fills step N+1's arrays while step N's copies may still be queued, and by the time it
fills step N+2's the engine has waited for step N. On CPU an array is used in place.
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._sets: list[dict[str, torch.Tensor]] = [{}, {}]
        self._turn = 0

    def next_step(self) -> None:
        """Switch to the other set of buffers (call once per step, before its `put`s)."""
        self._turn ^= 1

    def host_buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A pinned host tensor of `numel` elements from this step's set (device-to-host copies)."""
        buffers = self._sets[self._turn]
        buf = buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            size = max(numel, 2 * (buf.numel() if buf is not None else 0), 256)
            buf = buffers[name] = torch.empty(size, dtype=dtype, pin_memory=True)
        return buf[:numel]

    def put(self, name: str, array: np.ndarray) -> torch.Tensor:
        """`array` as a tensor on the device (the same memory on CPU)."""
        if not self.on_cuda:
            return torch.from_numpy(array)
        buffers = self._sets[self._turn]
        dtype = torch.from_numpy(array[:0]).dtype
        size = array.size
        buf = buffers.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype:
            buf = buffers[name] = torch.empty(max(size, 2 * (buf.numel() if buf is not None else 0), 256),
                                              dtype=dtype, pin_memory=True)
        host = buf[:size]
        host.numpy()[:] = array.reshape(-1)
        return host.view(array.shape).to(self.device, non_blocking=True)
