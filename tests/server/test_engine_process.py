"""The engine in its own process: same outputs as in a thread, and a core that dies, fails to
start or is shut down never leaves a request hanging or a process behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import pytest
from live_server import ENGINE_ARGS, process_engine

from llmserve.engine.async_engine import AsyncEngine, EngineDeadError
from llmserve.engine.llm_engine import LLMEngine
from llmserve.sampling_params import SamplingParams


@pytest.fixture
async def engine(checkpoint):
    async_engine = process_engine(checkpoint, 8)
    yield async_engine
    await asyncio.to_thread(async_engine.shutdown)


REQUESTS = [
    ("plain", "hello world", SamplingParams(max_tokens=12, temperature=0.0)),
    ("n2", "the quick brown fox", SamplingParams(max_tokens=8, n=2, temperature=0.8, seed=7)),
    ("logprobs", "one two three", SamplingParams(max_tokens=6, temperature=0.0, logprobs=3)),
    ("stop", "a b c d", SamplingParams(max_tokens=30, temperature=1.0, seed=3, stop=["e", "o"])),
    # Text the frontend builds from tokens (no stop strings): a stop token that adds no text,
    # special tokens kept, characters split across tokens.
    ("stop_token", "x y", SamplingParams(max_tokens=40, temperature=1.2, seed=11,
                                         stop_token_ids=list(range(3, 120)))),
    ("specials", "hi", SamplingParams(max_tokens=10, temperature=1.0, seed=2,
                                      skip_special_tokens=False)),
    ("unicode", "naïve café 東京 😀", SamplingParams(max_tokens=16, temperature=1.0, seed=4)),
    ("n2_text", "we", SamplingParams(max_tokens=9, n=2, temperature=1.0, seed=9)),
]


async def _run_all(engine: AsyncEngine) -> dict[str, list]:
    async def one(rid, prompt, params):
        stream = await engine.add_request(rid, prompt, params)
        return [out async for out in stream]

    results = await asyncio.gather(*(one(*r) for r in REQUESTS))
    return {r[0]: outs for r, outs in zip(REQUESTS, results)}


def _view(out) -> tuple:
    """Everything but float values, which differ in the last bits with the thread count."""
    return (out.finished, out.prompt_token_ids, out.num_cached_tokens,
            [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
              c.cumulative_logprob is None,
              c.logprobs and [[(t, lp.rank, lp.decoded_token) for t, lp in d.items()]
                              for d in c.logprobs]) for c in out.outputs])


def _logprob_values(out) -> list[float]:
    return [lp.logprob for c in out.outputs for d in (c.logprobs or []) for lp in d.values()]


async def test_outputs_match_the_in_process_engine(checkpoint, engine):
    threaded = AsyncEngine(LLMEngine.from_args(str(checkpoint), **ENGINE_ARGS))
    try:
        expected = await _run_all(threaded)
    finally:
        await asyncio.to_thread(threaded.shutdown)
    got = await _run_all(engine)
    assert got["stop_token"][-1].outputs[0].finish_reason == "stop"
    for rid, _, _ in REQUESTS:
        # Outputs are cumulative: the final one carries everything, and a stream may merge steps.
        assert _view(got[rid][-1]) == _view(expected[rid][-1]), rid
        assert _logprob_values(got[rid][-1]) == pytest.approx(_logprob_values(expected[rid][-1]),
                                                              abs=1e-4)
        for earlier, later in zip(got[rid], got[rid][1:]):
            for a, b in zip(earlier.outputs, later.outputs):
                assert b.token_ids[: len(a.token_ids)] == a.token_ids
                assert b.text.startswith(a.text)
    assert engine.num_unfinished == 0
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]


async def test_abort_storm_frees_every_block(engine):
    params = SamplingParams(max_tokens=300, ignore_eos=True)
    streams = [await engine.add_request(f"s{i}", "hello there", params) for i in range(6)]
    for stream in streams:
        async for out in stream:
            if out.outputs[0].token_ids:
                break  # leaving the loop aborts
    deadline = time.monotonic() + 10
    while engine.stats().get("kv_blocks_free") != engine.stats().get("kv_blocks_total"):
        assert time.monotonic() < deadline, engine.stats()
        await asyncio.sleep(0.02)
    assert engine.num_unfinished == 0 and engine.stats()["num_running"] == 0


async def test_killed_core_fails_in_flight_requests_and_rejects_new_ones(engine):
    stream = await engine.add_request("k", "hello", SamplingParams(max_tokens=400,
                                                                  ignore_eos=True))
    with pytest.raises(EngineDeadError, match="exited unexpectedly"):
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                os.kill(engine.core_pid, signal.SIGKILL)
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        await engine.add_request("k2", "hello", SamplingParams(max_tokens=2))


async def test_core_that_cannot_load_the_model_is_a_clear_error(checkpoint, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(checkpoint, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(Exception, match="safetensors|weights|No such file"):
        await asyncio.to_thread(process_engine, broken, 8)


async def test_shutdown_stops_the_core_process(checkpoint):
    engine = process_engine(checkpoint, 8)
    stream = await engine.add_request("x", "hi", SamplingParams(max_tokens=3))
    assert [o async for o in stream][-1].finished
    process = engine.engine.process
    await asyncio.to_thread(engine.shutdown)
    assert not process.is_alive() and process.exitcode == 0
    with pytest.raises(EngineDeadError):
        await engine.add_request("y", "hi", SamplingParams(max_tokens=3))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
async def test_idle_core_does_not_spin(engine):
    stream = await engine.add_request("idle", "hello", SamplingParams(max_tokens=3))
    async for _ in stream:
        pass
    await asyncio.sleep(0.2)
    before = _cpu_seconds(engine.core_pid)
    await asyncio.sleep(1.0)
    assert _cpu_seconds(engine.core_pid) - before < 0.1
