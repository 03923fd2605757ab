"""The checked-in gRPC stubs: up to date with the proto, importable, loose version guards."""

from __future__ import annotations

import importlib.util
import inspect

import pytest

from llmserve.server.grpc import generate_stubs, llmserve_pb2, llmserve_pb2_grpc


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools (a dev dependency) is not installed")
def test_checked_in_stubs_match_the_proto():
    assert generate_stubs.compiled_descriptor() == generate_stubs.checked_in_descriptor()
    assert generate_stubs.main(["--check"]) == 0


def test_stubs_do_not_pin_the_compiler_runtime_versions():
    # protobuf < 5.26 has no runtime_version module; grpcio is only held to the project floor.
    assert "runtime_version" not in inspect.getsource(llmserve_pb2)
    assert llmserve_pb2_grpc.GRPC_GENERATED_VERSION == generate_stubs.GRPC_FLOOR


def test_stubs_import_by_package_path_and_describe_the_v1_service():
    service = llmserve_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "llmserve.v1.Generation"
    assert {m.name for m in service.methods} == {
        "Generate", "GenerateStream", "Chat", "ChatStream", "Abort", "ListModels"}
    assert llmserve_pb2_grpc.llmserve_dot_server_dot_grpc_dot_llmserve__pb2 is llmserve_pb2
