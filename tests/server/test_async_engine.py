"""AsyncEngine: streaming, cancellation frees blocks, hooks, dead engine, bounded queue."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from live_server import ENGINE_ARGS, process_engine

from llmserve.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from llmserve.engine.llm_engine import LLMEngine
from llmserve.sampling_params import SamplingParams


def _build(mode: str, checkpoint, max_queued_requests: int = 8) -> AsyncEngine:
    if mode == "process":
        return process_engine(checkpoint, max_queued_requests)
    return AsyncEngine(LLMEngine.from_args(str(checkpoint), **ENGINE_ARGS),
                       max_queued_requests=max_queued_requests)


@pytest.fixture(params=["thread", "process"])
async def engine(request, checkpoint):
    """The same contract with the engine in a thread and in its own process."""
    async_engine = _build(request.param, checkpoint)
    yield async_engine
    await asyncio.to_thread(async_engine.shutdown)


@pytest.fixture
async def thread_engine(checkpoint):
    """In a thread only: for tests that reach into the LLMEngine."""
    async_engine = _build("thread", checkpoint)
    yield async_engine
    await asyncio.to_thread(async_engine.shutdown)


async def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_request_added(self, request_id, info):
        self.events.append(("added", request_id, len(info["prompt_token_ids"]), info.get("tag")))

    def on_first_token(self, request_id, ttft):
        self.events.append(("first", request_id, ttft))

    def on_token(self, request_id, num_new_tokens, interval):
        self.events.append(("token", request_id, num_new_tokens))

    def on_finished(self, output, usage, timings):
        self.events.append(("finished", output.request_id, output.outputs[0].finish_reason,
                            usage, timings))

    def on_step(self, step_stats):
        self.events.append(("step", step_stats))


class Exploding:
    def __getattr__(self, name):
        if name.startswith("on_"):
            def boom(*args):
                raise RuntimeError(f"{name} exploded")
            return boom
        raise AttributeError(name)


async def test_stream_yields_cumulative_outputs_until_finished(engine):
    stream = await engine.add_request("r1", "hello world", SamplingParams(max_tokens=6))
    lengths, final = [], None
    async for out in stream:
        lengths.append(len(out.outputs[0].token_ids))
        final = out
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert lengths == sorted(lengths) and lengths[-1] == 6
    assert stream.prompt_token_ids == final.prompt_token_ids
    assert engine.num_unfinished == 0


async def test_cancelled_consumer_aborts_request_and_frees_blocks(engine):
    rec = Recorder()
    engine.add_observer(rec)
    stream = await engine.add_request("long", "hello", SamplingParams(max_tokens=400,
                                                                     ignore_eos=True))
    seen = asyncio.Event()

    async def consume():
        async for _ in stream:
            seen.set()

    task = asyncio.ensure_future(consume())
    await seen.wait()
    assert engine.stats()["kv_cache_usage"] > 0
    task.cancel()
    await _wait_until(lambda: any(e[0] == "finished" for e in rec.events))
    finished = [e for e in rec.events if e[0] == "finished"][0]
    assert finished[2] == "abort"
    assert finished[3]["completion_tokens"] < 400
    await _wait_until(lambda: engine.stats()["kv_cache_usage"] == 0.0)
    assert engine.stats()["num_running"] == 0


async def test_break_out_of_async_for_aborts_request(engine):
    stream = await engine.add_request("brk", "hello", SamplingParams(max_tokens=400,
                                                                    ignore_eos=True))
    async for out in stream:
        if len(out.outputs[0].token_ids) >= 2:
            break
    await _wait_until(lambda: engine.num_unfinished == 0)
    await _wait_until(lambda: engine.stats()["kv_cache_usage"] == 0.0)


async def test_hooks_run_in_order_and_a_raising_hook_is_only_logged(engine, caplog):
    rec = Recorder()
    engine.add_observer(Exploding())
    engine.add_observer(rec)
    with caplog.at_level(logging.ERROR):
        stream = await engine.add_request("h1", "hello there", SamplingParams(max_tokens=5),
                                          info={"tag": "t"})
        outs = [o async for o in stream]
    kinds = [e[0] for e in rec.events if e[0] != "step"]
    assert kinds[0] == "added" and kinds[1] == "first" and kinds[-1] == "finished"
    assert set(kinds[2:-1]) <= {"token"}
    added, finished = rec.events[0], [e for e in rec.events if e[0] == "finished"][0]
    assert added[1:] == ("h1", len(outs[-1].prompt_token_ids), "t")
    usage, timings = finished[3], finished[4]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert 0 <= timings["ttft"] <= timings["e2e"]
    assert any(e[0] == "step" and "h1" in e[1].work for e in rec.events)
    assert "exploded" in caplog.text


async def test_engine_error_fails_in_flight_requests_and_rejects_new_ones(thread_engine):
    engine = thread_engine
    stream = await engine.add_request("d1", "hello", SamplingParams(max_tokens=400,
                                                                   ignore_eos=True))
    real_step = engine.engine.step
    calls = 0

    def failing_step():
        nonlocal calls
        calls += 1
        if calls > 2:
            raise RuntimeError("device lost")
        return real_step()

    engine.engine.step = failing_step
    with pytest.raises(EngineDeadError, match="device lost"):
        async for _ in stream:
            pass
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        await engine.add_request("d2", "hello", SamplingParams(max_tokens=2))


@pytest.mark.parametrize("mode", ["thread", "process"])
async def test_full_queue_rejects_with_queue_full_error(checkpoint, mode):
    engine = _build(mode, checkpoint, max_queued_requests=0)
    try:
        with pytest.raises(QueueFullError) as info:
            await engine.add_request("q", "hello", SamplingParams(max_tokens=2))
        assert info.value.retry_after > 0
        assert engine.num_unfinished == 0
    finally:
        engine.shutdown()


async def test_bad_request_raises_value_error_and_leaves_nothing_behind(engine):
    with pytest.raises(ValueError, match="maximum context length is 512"):
        await engine.add_request("big", "hello", SamplingParams(max_tokens=10_000))
    # Long enough that the first "dup" is still running when the second arrives (an engine in
    # its own process finishes a 3-token request before the next add_request is awaited).
    stream = await engine.add_request(
        "dup", "hello", SamplingParams(max_tokens=400, ignore_eos=True))
    with pytest.raises(ValueError, match="duplicate"):
        await engine.add_request("dup", "hello", SamplingParams(max_tokens=3))
    engine.abort("dup")
    assert [o async for o in stream][-1].finished
    assert engine.num_unfinished == 0


async def test_idle_engine_does_not_spin(thread_engine):
    engine = thread_engine
    calls = 0
    real_step = engine.engine.step

    def counting_step():
        nonlocal calls
        calls += 1
        return real_step()

    engine.engine.step = counting_step
    stream = await engine.add_request("idle", "hello", SamplingParams(max_tokens=3))
    async for _ in stream:
        pass
    await asyncio.sleep(0.05)
    after_request = calls
    await asyncio.sleep(0.3)
    assert calls == after_request <= 5
