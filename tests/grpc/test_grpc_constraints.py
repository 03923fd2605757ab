"""Constraints and tools through gRPC: the same request layer as HTTP, typed proto fields."""

from __future__ import annotations

import json
import pathlib
import sys

import grpc
import jsonschema
import pytest

from llmserve.engine.async_engine import AsyncEngine
from llmserve.models.random_checkpoint import build_random_checkpoint
from llmserve.server.grpc import llmserve_pb2 as pb
from llmserve.server.grpc.llmserve_pb2_grpc import GenerationStub
from llmserve.server.grpc.options import GrpcOptions
from llmserve.server.grpc.server import start_grpc_server

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "server"))
from tool_models import PARAMETERS, TOOLS, with_template  # noqa: E402

PET = {"type": "object", "additionalProperties": False, "required": ["kind", "age"],
       "properties": {"kind": {"enum": ["cat", "dog"]},
                      "age": {"type": "integer", "minimum": 0, "maximum": 9}}}
USER = [pb.ChatMessage(role="user", content="Weather in Oslo?")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("grpc-tools")
    return str(with_template(build_random_checkpoint(root / "tiny", "llama"), root / "hermes"))


@pytest.fixture
async def stub(model_dir):
    engine = AsyncEngine.from_args(max_queued_requests=16, model=model_dir, dtype="float32",
                                   num_kv_blocks=256, max_model_len=1024)
    server = await start_grpc_server(engine, 0, GrpcOptions())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield GenerationStub(channel)
    await channel.close()
    await server.stop(0)
    engine.shutdown()


def _tools() -> list[pb.Tool]:
    return [pb.Tool(name=t["function"]["name"], description=t["function"].get("description", ""),
                    parameters_json=json.dumps(t["function"]["parameters"])) for t in TOOLS]


async def test_json_schema_and_choice_hold_over_grpc(stub):
    fmt = pb.ResponseFormat(type="json_schema", schema_name="pet", schema_json=json.dumps(PET))
    reply = await stub.Chat(pb.ChatRequest(messages=USER, sampling=pb.SamplingOptions(
        n=3, seed=2, max_tokens=100, response_format=fmt)))
    for c in reply.completions:
        jsonschema.validate(json.loads(c.content), PET)
        assert c.text == c.content and c.finish_reason == "stop"
    choice = pb.StructuredOutputs(choice=pb.StringList(values=["yes", "no"]))
    reply = await stub.Generate(pb.GenerateRequest(text="Well", sampling=pb.SamplingOptions(
        n=2, seed=1, structured_outputs=choice, logit_bias={5: -100.0})))
    assert {c.text for c in reply.completions} <= {"yes", "no"}


async def test_required_tool_choice_returns_calls_whole_and_streamed(stub):
    request = pb.ChatRequest(
        messages=USER, tools=_tools(), tool_choice=pb.ToolChoice(mode="required"),
        parallel_tool_calls=False, sampling=pb.SamplingOptions(seed=4, max_tokens=300))
    reply = await stub.Chat(request)
    (completion,) = reply.completions
    assert completion.finish_reason == "tool_calls" and len(completion.tool_calls) == 1
    call = completion.tool_calls[0]
    jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
    chunks = [c async for c in stub.ChatStream(request)]
    pieces = [p for c in chunks for p in c.tool_calls]
    assert pieces[0].id.startswith("call_") and pieces[0].name == call.name
    assert "".join(p.arguments for p in pieces) == call.arguments
    assert chunks[-1].finish_reason == "tool_calls"
    assert "".join(c.text for c in chunks) == completion.text


async def test_bad_constraints_are_invalid_argument(stub):
    cases = [
        pb.ChatRequest(messages=USER, tools=_tools(),
                       tool_choice=pb.ToolChoice(function_name="nope")),
        pb.ChatRequest(messages=USER, sampling=pb.SamplingOptions(
            response_format=pb.ResponseFormat(type="json_schema", schema_json="{not json"))),
        pb.ChatRequest(messages=USER, sampling=pb.SamplingOptions(logit_bias={10**6: 1.0})),
    ]
    for request in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Chat(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


async def test_a_grammar_that_fails_to_compile_is_invalid_argument_with_the_cause(model_dir):
    """After admission (compiled off the step loop): unary and streamed calls both name it."""
    engine = AsyncEngine.from_args(max_queued_requests=16, model=model_dir, dtype="float32",
                                   num_kv_blocks=256, max_model_len=1024)

    def refuse(spec):
        raise ValueError("the backend refused this schema")

    engine.engine.structured.backend.compile = refuse
    server = await start_grpc_server(engine, 0, GrpcOptions())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = GenerationStub(channel)
    fmt = pb.ResponseFormat(type="json_schema", schema_name="pet", schema_json=json.dumps(PET))
    request = pb.ChatRequest(messages=USER, sampling=pb.SamplingOptions(
        max_tokens=20, response_format=fmt))
    try:
        for call in (stub.Chat(request), _drain(stub.ChatStream(request))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could not be compiled" in info.value.details()
            assert "refused this schema" in info.value.details()
    finally:
        await channel.close()
        await server.stop(0)
        engine.shutdown()


async def _drain(stream) -> list:
    return [chunk async for chunk in stream]
