"""Suite-wide set-up that must happen before any test module imports llmserve or triton."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. triton.jit reads
# TRITON_INTERPRET when a kernel is decorated, i.e. when llmserve.kernels is first imported, so it
# is set here, before any folder's tests import the engine. CPU code paths never call Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
