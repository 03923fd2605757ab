"""The gRPC front end through a real grpc.aio client over loopback."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmserve.engine.async_engine import AsyncEngine
from llmserve.models.random_checkpoint import build_random_checkpoint
from llmserve.server.grpc import llmserve_pb2 as pb
from llmserve.server.grpc.llmserve_pb2_grpc import GenerationStub
from llmserve.server.grpc.options import GrpcOptions
from llmserve.server.grpc.server import start_grpc_server

torch.set_num_threads(min(2, torch.get_num_threads()))
KEY = "sesame"
AUTH = (("authorization", f"Bearer {KEY}"),)
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_random_checkpoint(tmp_path_factory.mktemp("grpc") / "tiny", "llama"))


@dataclass
class Served:
    engine: AsyncEngine
    stub: GenerationStub
    channel: grpc.aio.Channel
    port: int
    finished: list  # (request_id, finish reasons, info) of every finished request


class _Finished:
    def __init__(self) -> None:
        self.rows: list = []
        self.info: dict = {}

    def on_request_added(self, request_id, info):
        self.info[request_id] = info

    def on_finished(self, output, usage, timings):
        self.rows.append((output.request_id, [c.finish_reason for c in output.outputs],
                          self.info.get(output.request_id), usage))


async def _serve(model_dir: str, max_queued: int = 64):
    engine = AsyncEngine.from_args(max_queued_requests=max_queued, model=model_dir,
                                   dtype="float32", num_kv_blocks=64)
    server = await start_grpc_server(engine, 0, GrpcOptions(api_keys=(KEY,)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return engine, server, channel


@pytest.fixture
async def served(model_dir):
    engine, server, channel = await _serve(model_dir)
    seen = _Finished()
    engine.add_observer(seen)
    yield Served(engine, GenerationStub(channel), channel, server.port, seen.rows)
    await channel.close()
    await server.stop(0)
    engine.shutdown()


def _gen(prompt="hello there", **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, sampling=pb.SamplingOptions(**sampling))


async def _status_of(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value.code()


async def test_unary_and_streaming_generate_agree_token_for_token(served):
    req = _gen(max_tokens=6, **GREEDY)
    unary = await served.stub.Generate(req, metadata=AUTH)
    (c,) = unary.completions
    assert len(c.token_ids) == 6 and c.finish_reason == "length"
    prompt_len = len(served.engine.tokenizer.encode("hello there"))
    assert unary.usage.prompt_tokens == prompt_len and unary.usage.completion_tokens == 6
    chunks = [ch async for ch in served.stub.GenerateStream(req, metadata=AUTH)]
    assert [t for ch in chunks for t in ch.token_ids] == list(c.token_ids)
    assert "".join(ch.text for ch in chunks) == c.text
    # Running usage grows chunk by chunk; only the last chunk carries the finish reason.
    assert [ch.usage.completion_tokens for ch in chunks] == sorted(
        ch.usage.completion_tokens for ch in chunks)
    assert [ch.finish_reason for ch in chunks][-1] == "length"
    assert all(not ch.finish_reason for ch in chunks[:-1])
    assert chunks[-1].usage.total_tokens == prompt_len + 6


async def test_token_id_prompt_and_n_completions_each_end_with_a_finish_reason(served):
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
                             sampling=pb.SamplingOptions(max_tokens=4, n=2, seed=1,
                                                         ignore_eos=True))
    chunks = [ch async for ch in served.stub.GenerateStream(req, metadata=AUTH)]
    finished = {ch.index: ch.finish_reason for ch in chunks if ch.finish_reason}
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage.prompt_tokens == 4 and chunks[-1].usage.completion_tokens == 8


async def test_chat_goes_through_the_chat_template(served):
    messages = [pb.ChatMessage(role="user", content="hi")]
    tok = served.engine.tokenizer
    expected = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]),
                              add_special_tokens=False))
    req = pb.ChatRequest(messages=messages, sampling=pb.SamplingOptions(max_tokens=3, **GREEDY))
    unary = await served.stub.Chat(req, metadata=AUTH)
    assert unary.usage.prompt_tokens == expected
    chunks = [ch async for ch in served.stub.ChatStream(req, metadata=AUTH)]
    assert "".join(ch.text for ch in chunks) == unary.completions[0].text
    assert chunks[-1].finish_reason == "length"


async def test_logprobs_carry_the_requested_alternatives(served):
    reply = await served.stub.Generate(_gen(max_tokens=3, logprobs=2, **GREEDY), metadata=AUTH)
    entries = reply.completions[0].logprobs
    assert len(entries) == 3
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token_id == e.token_id


async def _wait_blocks_free(engine: AsyncEngine, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.get("num_running") == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"blocks not freed: {engine.stats()}")


async def test_client_cancel_mid_stream_aborts_and_frees_blocks(served):
    call = served.stub.GenerateStream(_gen(max_tokens=1000, **GREEDY), metadata=AUTH)
    await call.read()
    await call.read()
    assert served.engine.stats()["kv_blocks_free"] < served.engine.stats()["kv_blocks_total"]
    call.cancel()
    await _wait_blocks_free(served.engine)
    assert served.engine.num_unfinished == 0
    ((_, reasons, info, usage),) = served.finished
    assert reasons == ["abort"] and usage["completion_tokens"] < 1000
    assert info["endpoint"] == "grpc" and info["grpc_method"] == "GenerateStream"


async def test_abort_rpc_ends_the_stream_with_aborted(served):
    req = _gen(max_tokens=500, **GREEDY)
    req.request_id = "job-7"
    call = served.stub.GenerateStream(req, metadata=AUTH)
    await call.read()
    assert (await served.stub.Abort(pb.AbortRequest(request_id="job-7"), metadata=AUTH)).found
    assert await _status_of(_drain(call)) == grpc.StatusCode.ABORTED
    assert not (await served.stub.Abort(pb.AbortRequest(request_id="job-7"),
                                        metadata=AUTH)).found
    await _wait_blocks_free(served.engine)


async def _drain(call) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_error_codes_for_bad_input_unknown_model_and_missing_key(served):
    stub = served.stub
    bad = [_gen(temperature=5.0), _gen(""), pb.GenerateRequest(),
           pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**6]))]
    for req in bad:
        assert await _status_of(stub.Generate(req, metadata=AUTH)) == (
            grpc.StatusCode.INVALID_ARGUMENT), req
    assert await _status_of(_drain(stub.GenerateStream(_gen(max_tokens=5000), metadata=AUTH))
                            ) == grpc.StatusCode.INVALID_ARGUMENT
    unknown = pb.GenerateRequest(model="gpt-9", text="x")
    assert await _status_of(stub.Generate(unknown, metadata=AUTH)) == grpc.StatusCode.NOT_FOUND
    assert await _status_of(stub.Generate(_gen())) == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("x-api-key", "nope"),)
    assert await _status_of(stub.ListModels(pb.ListModelsRequest(), metadata=wrong)) == (
        grpc.StatusCode.UNAUTHENTICATED)
    models = await stub.ListModels(pb.ListModelsRequest(), metadata=(("x-api-key", KEY),))
    assert [m.id for m in models.models] == [served.engine.model_name]


async def test_full_queue_is_resource_exhausted(model_dir):
    engine, server, channel = await _serve(model_dir, max_queued=0)
    try:
        code = await _status_of(GenerationStub(channel).Generate(_gen(), metadata=AUTH))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await channel.close()
        await server.stop(0)
        engine.shutdown()


async def test_engine_failure_is_internal_and_health_turns_not_serving(served):
    health = health_pb2_grpc.HealthStub(served.channel)
    check = health_pb2.HealthCheckRequest(service="llmserve.v1.Generation")
    assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING

    def broken_step():
        raise RuntimeError("device lost")

    served.engine.engine.step = broken_step
    code = await _status_of(served.stub.Generate(_gen(max_tokens=3), metadata=AUTH))
    assert code == grpc.StatusCode.INTERNAL
    assert await _status_of(served.stub.Generate(_gen(), metadata=AUTH)) == (
        grpc.StatusCode.INTERNAL)
    deadline = time.monotonic() + 5
    while (await health.Check(check)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_reflection_lists_services_and_serves_the_proto(served):
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)

    async def ask(**kw):
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(**kw))
        reply = await call.read()
        await call.done_writing()
        return reply

    listed = await ask(list_services="")
    names = {s.name for s in listed.list_services_response.service}
    assert {"llmserve.v1.Generation", "grpc.health.v1.Health"} <= names
    found = await ask(file_containing_symbol="llmserve.v1.Generation")
    assert found.file_descriptor_response.file_descriptor_proto


async def test_grpc_requests_land_in_the_trace_ledger_as_endpoint_grpc(served, tmp_path):
    from llmserve.observability.ledger import TraceLedger, query_rows
    from llmserve.observability.recorder import TraceRecorder

    ledger = TraceLedger(tmp_path / "traces.db")
    served.engine.add_observer(TraceRecorder(ledger, served.engine, model_name="tiny"))
    req = _gen(max_tokens=4, **GREEDY)
    req.user = "alice"
    await served.stub.Generate(req, metadata=AUTH)
    await _drain(served.stub.GenerateStream(req, metadata=AUTH))
    ledger.close()
    rows = query_rows(tmp_path / "traces.db")
    assert [(r["endpoint"], r["status"], r["completion_tokens"]) for r in rows] == [
        ("grpc", "ok", 4), ("grpc", "ok", 4)]
    assert rows[0]["user_hash"] and rows[0]["user_hash"] != "alice"
