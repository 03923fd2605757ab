"""Suite-wide set-up that must happen before any test module imports llmserve or triton."""

from __future__ import annotations

import os
import tempfile

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. triton.jit reads
# TRITON_INTERPRET when a kernel is decorated, i.e. when llmserve.kernels is first imported, so it
# is set here, before any folder's tests import the engine. CPU code paths never call Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Servers started by tests (in-process or as subprocesses, which inherit the environment) keep
# their default trace ledger and batch store in a scratch folder, never in the user's home.
_scratch = tempfile.mkdtemp(prefix="llmserve-tests-")
os.environ.setdefault("LLMSERVE_TRACE_DB", os.path.join(_scratch, "traces.db"))
os.environ.setdefault("LLMSERVE_BATCH_DIR", os.path.join(_scratch, "batches"))
