"""Compilation off the step loop: requests wait for their grammar without stalling others, the
cache makes a repeated spec ready at once, an abort while waiting frees everything, and a
compile that fails or times out ends the request instead of hanging it."""

from __future__ import annotations

import json
import threading

import pytest

from llmserve.engine.llm_engine import LLMEngine
from llmserve.sampling_params import SamplingParams, StructuredOutputsParams


@pytest.fixture
def engine(tiny_dir):
    engine = LLMEngine.from_args(tiny_dir, num_kv_blocks=64, block_size=16)
    yield engine
    engine.shutdown()


@pytest.fixture
def gate(engine):
    """Holds every compilation until `gate.set()`."""
    event = threading.Event()
    backend = engine.structured.backend
    compile_ = backend.compile

    def slow_compile(spec):
        event.wait(30)
        return compile_(spec)

    backend.compile = slow_compile
    yield event
    event.set()


def _constrained(regex: str = "[a-c]{3}") -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=0, max_tokens=20,
                          structured_outputs=StructuredOutputsParams(regex=regex))


def test_waiting_request_does_not_stall_others(engine, gate, run):
    engine.add_request("slow", [1, 2, 3], _constrained())
    engine.add_request("free", [4, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True))
    done = {}
    for _ in range(8):  # the free request finishes while the other still waits
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert "free" in done and "slow" not in done
    assert engine.stats()["num_waiting"] == 1 and engine.kv.num_free_blocks == engine.kv.num_blocks
    gate.set()
    out = run(engine)["slow"].outputs[0]
    assert out.finish_reason == "stop" and len(out.text) == 3 and set(out.text) <= set("abc")


def test_abort_while_waiting_frees_everything(engine, gate, run):
    engine.add_request("w", [1, 2, 3], SamplingParams(
        n=3, max_tokens=20, structured_outputs=StructuredOutputsParams(regex="x+")))
    engine.step()
    assert engine.has_unfinished_requests()
    engine.abort_request("w")
    done = run(engine)
    assert [c.finish_reason for c in done["w"].outputs] == ["abort"] * 3
    assert not engine.has_unfinished_requests() and not engine.structured.waiting
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert "w" not in engine.outputs.groups and not engine.scheduler.requests


def test_compile_timeout_ends_the_request(engine, gate, run):
    engine.structured.compile_timeout_s = 0.05
    engine.add_request("t", [1, 2, 3], _constrained("[0-9]+"))
    out = run(engine)["t"]
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert out.outputs[0].error == "the request's grammar could not be compiled: grammar " \
        "compilation timed out"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_compile_error_ends_the_request(engine, run):
    def broken(spec):
        raise ValueError("backend refused it")

    engine.structured.backend.compile = broken
    engine.add_request("e", [1, 2, 3], SamplingParams(
        n=2, max_tokens=20, structured_outputs=StructuredOutputsParams(regex="[x-z]+")))
    outs = run(engine)["e"].outputs
    assert [c.finish_reason for c in outs] == ["abort", "abort"]
    assert all(c.error == "the request's grammar could not be compiled: backend refused it"
               for c in outs)
    assert not engine.has_unfinished_requests()


def test_client_aborts_carry_no_error(engine, gate, run):
    engine.add_request("c", [1, 2, 3], _constrained())
    engine.step()
    engine.abort_request("c")
    assert run(engine)["c"].outputs[0].error is None


def test_cached_spec_is_ready_when_added(engine, run):
    so = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "boolean"}},
                                       "required": ["a"], "additionalProperties": False})
    engine.add_request("first", [1, 2], SamplingParams(max_tokens=60, structured_outputs=so))
    run(engine)
    misses = engine.structured.compiler.misses
    # The same schema with its keys in another order is the same cache entry.
    same = StructuredOutputsParams(json={"additionalProperties": False, "required": ["a"],
                                         "type": "object", "properties": {"a": {"type": "boolean"}}})
    engine.add_request("second", [1, 2], SamplingParams(max_tokens=200, structured_outputs=same))
    assert not engine.structured.waiting  # straight into the scheduler
    assert engine.structured.compiler.misses == misses
    out = run(engine)["second"].outputs[0]
    assert out.finish_reason == "stop"
    assert json.loads(out.text) in ({"a": True}, {"a": False})
