"""`llmserve serve` leaves a core to the event loop unless told otherwise."""

from __future__ import annotations

import pytest
import torch

from llmserve.commands.serve import engine_cpu_threads


def test_explicit_thread_count_is_used():
    assert engine_cpu_threads(1) == 1


def test_default_leaves_one_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert engine_cpu_threads(None) == 7


def test_default_on_one_core_is_one_thread(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert engine_cpu_threads(None) == 1


def test_omp_num_threads_wins_over_the_default(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert engine_cpu_threads(None) == 3
    finally:
        torch.set_num_threads(before)


def test_zero_threads_is_a_clear_error():
    with pytest.raises(ValueError, match="--cpu-threads must be >= 1"):
        engine_cpu_threads(0)
