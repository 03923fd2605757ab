"""`llmserve serve` leaves a core to the event loop unless told otherwise."""

from __future__ import annotations

import pytest
import torch

from llmserve.commands.serve import set_cpu_threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_explicit_thread_count_is_applied():
    assert set_cpu_threads(1) == 1 and torch.get_num_threads() == 1


def test_default_leaves_one_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert set_cpu_threads(None) == 7 and torch.get_num_threads() == 7


def test_omp_num_threads_wins_over_the_default(monkeypatch):
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert set_cpu_threads(None) == 3


def test_zero_threads_is_a_clear_error():
    with pytest.raises(ValueError, match="--cpu-threads must be >= 1"):
        set_cpu_threads(0)
