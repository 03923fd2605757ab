"""Settings of the gRPC front end and its `llmserve serve` option (no grpc import)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any


@dataclass
class GrpcOptions:
    """Settings of the gRPC front end.

    Attributes:
        host: interface to bind ("127.0.0.1" local only, "0.0.0.0" all).
        served_model_names: names accepted as `model` (default: the engine's model name).
        api_keys: accepted keys (metadata `authorization: Bearer KEY` or `x-api-key: KEY`);
            empty means no authentication. Health and reflection never need a key.
        max_message_bytes: largest request or response message.
        grace_s: seconds running calls may finish when the server stops.
        reflection: serve gRPC server reflection.
        context: the HTTP server's ServerContext, if any: gRPC calls then count as in flight
            for its drain and are refused (UNAVAILABLE) while it drains, and its tool-call and
            reasoning parsers are used.
        tool_call_parser: parser of `tools` calls without a context (default: detected from
            the chat template).
        reasoning_parser: reasoning parser without a context (default: none).
    """

    host: str = "127.0.0.1"
    served_model_names: list[str] | None = None
    api_keys: tuple[str, ...] = ()
    max_message_bytes: int = 16 * 1024 * 1024
    grace_s: float = 5.0
    reflection: bool = True
    context: Any = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


def add_grpc_args(parser: argparse.ArgumentParser) -> None:
    """`--grpc-port` for `llmserve serve`."""
    parser.add_argument_group("gRPC").add_argument(
        "--grpc-port", type=int, default=None, metavar="PORT",
        help="also serve the gRPC API (llmserve.v1.Generation, health, reflection) on PORT, "
             "on the same host, engine, API keys and trace ledger")

