"""Call llmserve's gRPC API: list models, one unary call, one streamed chat, health.

    llmserve serve --port 8000 --grpc-port 50051 &
    python examples/grpc_client.py --target 127.0.0.1:50051 "Tell me a story"

Every stream chunk carries the new token ids, the text delta and the running usage; the last
chunk of each completion carries its finish reason. Ctrl-C cancels the call, which aborts the
request on the server and frees its KV-cache blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.server.grpc import llmserve_pb2 as pb
from llmserve.server.grpc.llmserve_pb2_grpc import GenerationStub


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="Tell me a short story.")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--api-key", default=None, help="the server's --api-key, if any")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()

    async with grpc.aio.insecure_channel(args.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="llmserve.v1.Generation"))
        print("health:", health_pb2.HealthCheckResponse.ServingStatus.Name(status.status))

        stub = GenerationStub(channel)
        models = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
        model = models.models[0].id
        print(f"model: {model} (context {models.models[0].max_model_len} tokens)")

        sampling = pb.SamplingOptions(max_tokens=args.max_tokens, temperature=0.7, seed=7)
        reply = await stub.Generate(pb.GenerateRequest(model=model, text="The capital of France is",
                                                       sampling=sampling), metadata=metadata)
        c = reply.completions[0]
        print(f"unary: {c.text!r} ({c.finish_reason}; {reply.usage.prompt_tokens} prompt + "
              f"{reply.usage.completion_tokens} completion tokens)")

        request = pb.ChatRequest(model=model, messages=[pb.ChatMessage(role="user",
                                                                       content=args.prompt)],
                                 sampling=sampling)
        try:
            async for chunk in stub.ChatStream(request, metadata=metadata):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finish_reason:
                    u = chunk.usage
                    print(f"\n[{chunk.finish_reason}] prompt={u.prompt_tokens} "
                          f"cached={u.cached_tokens} completion={u.completion_tokens}")
        except grpc.aio.AioRpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
