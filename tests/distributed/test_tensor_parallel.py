"""Tensor parallelism on CPU (gloo): TP=2 agrees with TP=1, and a dead worker fails requests.

Each TP=2 engine spawns one worker process; tests shut their engine down so the next one can
create the process group again.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import torch.distributed as dist

from llmserve import LLM, SamplingParams
from llmserve.engine.async_engine import AsyncEngine, EngineDeadError
from llmserve.engine.llm_engine import LLMEngine
from llmserve.engine.model_runner import ModelRunner
from llmserve.engine.worker import WorkerError
from tests.engine.parity import prefix_prompts

ENGINE_ARGS = dict(block_size=4, num_kv_blocks=96, max_num_batched_tokens=48, max_num_seqs=8)


def prompts(seed: int = 0) -> list[list[int]]:
    """Mixed lengths (chunked prefill at 48 tokens a step); half share a 20-token prefix."""
    return prefix_prompts([1, 6, 13, 40, 70, 25], 500, 20, seed)


def generate(path: str, tp: int):
    llm = LLM(path, tensor_parallel_size=tp, **ENGINE_ARGS)
    try:
        params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
        return outs, llm.engine.runner, llm.stats()
    finally:
        llm.engine.shutdown()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["llama-kv2", "qwen3-kv1-tied"])
def test_tp2_matches_tp1_greedy_tokens_and_logprobs(checkpoint_dir, name):
    path = checkpoint_dir(name)
    single, runner1, _ = generate(path, 1)
    assert isinstance(runner1, ModelRunner) and not multiprocessing.active_children()
    split, executor, stats = generate(path, 2)
    assert stats["prefix_cache_hits"] > 0  # the shared prefix was reused on every rank
    for a, b in zip(single, split, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for lp_a, lp_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert lp_a.keys() == lp_b.keys()
            for token in lp_a:
                assert abs(lp_a[token].logprob - lp_b[token].logprob) < 1e-4
    # Each rank caches one KV head: its shard of two, or the single head replicated.
    assert runner1.kv_cache.shape[4] == (2 if name == "llama-kv2" else 1)
    assert executor.runner.kv_cache.shape[4] == 1
    assert executor.num_blocks == runner1.num_blocks
    assert not any(p.is_alive() for p in executor.workers.procs), "shutdown must stop the workers"
    assert not dist.is_initialized()


@pytest.mark.timeout(120)
def test_killed_worker_fails_the_step_with_clear_error(checkpoint_dir):
    engine = LLMEngine.from_args(checkpoint_dir("llama-kv2"), tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        for i in range(3):
            engine.add_request(str(i), [5, 6, 7, 8 + i], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        os.kill(engine.runner.workers.procs[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker rank 1 .*killed by SIGKILL.*fails its requests"):
            engine.step()
        assert time.monotonic() - start < 10
        with pytest.raises(WorkerError, match="rank 1"):  # stays failed; never hangs
            engine.step()
        assert not dist.is_initialized()
    finally:
        engine.shutdown()


@pytest.mark.timeout(120)
async def test_killed_worker_fails_in_flight_streams(checkpoint_dir):
    args = {**ENGINE_ARGS, "num_kv_blocks": 256}
    engine = AsyncEngine(LLMEngine.from_args(checkpoint_dir("llama-kv2"), tensor_parallel_size=2, **args))
    try:
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        streams = [await engine.add_request(f"r{i}", [5, 6, 7 + i], params) for i in range(2)]
        for stream in streams:
            await stream.__anext__()  # both are running
        os.kill(engine.engine.runner.workers.procs[0].pid, signal.SIGKILL)
        for stream in streams:
            with pytest.raises(EngineDeadError, match="tensor-parallel worker rank 1"):
                async for _ in stream:
                    pass
        assert not engine.is_healthy
    finally:
        engine.shutdown()
        engine.engine.shutdown()
