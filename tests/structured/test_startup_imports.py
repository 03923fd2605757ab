"""Engine start-up does not import torch's compiler stack for the grammar backend (llguidance's
torch helpers apply torch.compile at import: seconds of start-up on a small machine)."""

from __future__ import annotations

import subprocess
import sys

import torch

from llmserve.structured.llguidance_backend import fill_next_token_bitmask


def test_building_an_engine_does_not_import_dynamo(tiny_dir):
    code = ("import sys; from llmserve import LLM; LLM(sys.argv[1], dtype='float32'); "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, tiny_dir], capture_output=True, text=True, check=True,
                          timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_bitmask_writers_refuse_what_the_parser_cannot_write_to():
    class Matcher:
        def unsafe_compute_mask_ptr(self, ptr, size):  # pragma: no cover - must not be reached
            raise AssertionError("called with a bad bitmask")

    for bad in (torch.zeros(2, 4, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int32).t(),
                torch.zeros(8, dtype=torch.int32)):
        try:
            fill_next_token_bitmask(Matcher(), bad, 0)
        except ValueError as exc:
            assert "contiguous 2-d int32" in str(exc)
        else:
            raise AssertionError(f"accepted {bad.shape} {bad.dtype}")
