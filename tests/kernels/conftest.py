"""Kernel tests: Triton kernels against their torch twins in `llmserve.kernels.ref`.

Without CUDA the kernels run in Triton's CPU interpreter. TRITON_INTERPRET is read when a
kernel is decorated, so it is set here, before any test module imports a kernel module.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

try:
    import triton  # noqa: F401
except ImportError:
    # The torch twins are the whole story without Triton; the native C kernel needs no Triton.
    collect_ignore = [p.name for p in Path(__file__).parent.glob("test_*.py")
                      if p.name != "test_cpu_native_decode.py"]
else:
    # A kernel module imported earlier in this process was decorated for the compiled path;
    # decorate it again so the interpreter (or the compiler) choice above applies.
    for _name in [m for m in list(sys.modules) if m.startswith("llmserve.kernels.")]:
        if _name.rsplit(".", 1)[1] not in ("ref", "ops", "common"):
            importlib.reload(sys.modules[_name])


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@dataclass
class PagedBatch:
    """A flat batch over a paged cache, shaped as `llmserve.kernels.ref` documents."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    scale: float

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())

    def reference(self) -> torch.Tensor:
        """The torch twin's output, computed in float32 from the same (rounded) inputs."""
        from llmserve.kernels import ref

        return ref.paged_attention(
            self.q.float(), self.k_cache.float(), self.v_cache.float(), self.query_start_loc,
            self.seq_lens, self.block_tables, self.scale,
        )


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> PagedBatch:
    """Random cache with shuffled block ids (so tables are not contiguous) and spare blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-s // block_size) for s in seq_lens]
    total = sum(blocks) + 2
    perm = torch.randperm(total, generator=gen)
    # Padding entries point at a real block: kernels must stop at seq_len, not at the table.
    tables = torch.full((len(seq_lens), max(blocks) + 1), int(perm[-1]), dtype=torch.int32)
    used = 0
    for row, n in enumerate(blocks):
        tables[row, :n] = perm[used : used + n]
        used += n
    shape = (total, block_size, num_kv_heads, head_dim)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen)
    return PagedBatch(
        q=q.to(device, dtype),
        k_cache=torch.randn(shape, generator=gen).to(device, dtype),
        v_cache=torch.randn(shape, generator=gen).to(device, dtype),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        scale=head_dim**-0.5,
    )


@pytest.fixture
def paged_batch(device: torch.device) -> Callable[..., PagedBatch]:
    """Factory: paged_batch(q_lens, seq_lens, num_kv_heads, group, head_dim, block_size, dtype)."""

    def build(*args: object, **kwargs: object) -> PagedBatch:
        return make_paged_batch(*args, device=device, **kwargs)  # type: ignore[arg-type]

    return build


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Comparison tolerance against a float32 reference for outputs stored in `dtype`."""
    return {
        torch.float32: {"atol": 1e-4, "rtol": 1e-4},
        torch.float16: {"atol": 5e-3, "rtol": 5e-3},
        torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    }[dtype]


@pytest.fixture
def tol() -> Callable[[torch.dtype], dict[str, float]]:
    return tolerance
