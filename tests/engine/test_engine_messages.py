"""The messages between an AsyncEngine and its step loop, and their form on the engine-core pipe."""

from __future__ import annotations

import pickle

import pytest

from llmserve.engine.messages import (
    Abort,
    AbortAll,
    Added,
    AddRequest,
    Dead,
    Failed,
    Ready,
    Rejected,
    StepReport,
    Stop,
    Stopped,
    dumps,
    loads,
)
from llmserve.sampling_params import SamplingParams

MESSAGES = [
    AddRequest("r1", "hello", SamplingParams(max_tokens=3, stop=["x"]), 12.5, 1),
    Abort(["r1", "r2"]),
    AbortAll(),
    Stop(),
    StepReport([Added("r1", [1, 2]), Rejected("r2", ValueError("too long"))],
               [("r1", None, False, 0, None, 0, 1, {}, [])], {"num_waiting": 0}, None),
    Ready({"num_kv_blocks": 64}),
    Failed(RuntimeError("no weights")),
    Dead(RuntimeError("device lost"), "Traceback ..."),
    Dead(RuntimeError("gone"), None),
    Stopped(),
]


def _comparable(message):
    """Exceptions do not compare equal: compare their type and text instead."""
    if isinstance(message, BaseException):
        return (type(message), str(message))
    if isinstance(message, (tuple, list)):
        return type(message), [_comparable(m) for m in message]
    return message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_the_pipe_with_its_type(message):
    back = loads(dumps(message))
    assert type(back) is type(message)
    assert _comparable(back) == _comparable(message)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_on_the_pipe_a_message_is_a_plain_tuple_with_a_kind_code(message):
    raw = pickle.loads(dumps(message))
    assert type(raw) is tuple and isinstance(raw[0], int)
    assert raw[1:] == tuple(message) or isinstance(message, (StepReport, Failed, Dead))
    # No message class is pickled by reference: the names cost nothing per message.
    assert type(message).__name__.encode() not in dumps(message)


def test_different_kinds_with_the_same_fields_stay_apart():
    assert type(loads(dumps(Stop()))) is Stop
    assert type(loads(dumps(Stopped()))) is Stopped
    assert type(loads(dumps(AbortAll()))) is AbortAll
