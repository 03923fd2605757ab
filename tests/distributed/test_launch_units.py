"""Launch detection, timeouts and the NCCL worker watcher, without starting any rank."""

from __future__ import annotations

import os
import threading

import pytest

from llmserve.distributed import parallel_state
from llmserve.distributed.parallel_state import env_launch, timeout_seconds
from llmserve.engine import executor
from llmserve.engine.llm_engine import build_engine_config


def test_env_launch_reads_torchrun_variables_and_ignores_a_world_of_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert env_launch() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_launch() == (1, 2, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert env_launch() is None
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="must be integers"):
        env_launch()


def test_distributed_timeout_env_is_validated(monkeypatch):
    monkeypatch.delenv(parallel_state.TIMEOUT_ENV, raising=False)
    assert timeout_seconds() == parallel_state.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(parallel_state.TIMEOUT_ENV, "12.5")
    assert timeout_seconds() == 12.5
    for bad in ("soon", "0"):
        monkeypatch.setenv(parallel_state.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=parallel_state.TIMEOUT_ENV):
            timeout_seconds()


def test_torchrun_world_size_must_equal_tensor_parallel_size(monkeypatch, checkpoint_dir):
    config = build_engine_config(checkpoint_dir("llama-kv2"), tensor_parallel_size=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="WORLD_SIZE=4 but tensor_parallel_size=2"):
        executor.create_runner(config)


def test_engine_config_rejects_a_split_the_heads_do_not_allow(checkpoint_dir):
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        build_engine_config(checkpoint_dir("llama-kv2"), tensor_parallel_size=3)


class FakeProc:
    """A process whose sentinel becomes ready when `exit()` is called."""

    def __init__(self) -> None:
        self.sentinel, self._w = os.pipe()

    def exit(self) -> None:
        os.close(self._w)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("expected_exit", [False, True])
def test_nccl_watcher_aborts_only_on_an_unexpected_worker_exit(monkeypatch, expected_exit):
    aborted = threading.Event()
    monkeypatch.setattr(executor.dist.distributed_c10d, "_abort_process_group", aborted.set)
    proc, closing, lost = FakeProc(), threading.Event(), threading.Event()
    watcher = threading.Thread(target=executor._watch_nccl_workers, args=([proc], closing, lost))
    watcher.start()
    if expected_exit:
        closing.set()
    proc.exit()
    watcher.join(10)
    os.close(proc.sentinel)
    assert not watcher.is_alive()
    assert lost.is_set() is aborted.is_set() is (not expected_exit)
