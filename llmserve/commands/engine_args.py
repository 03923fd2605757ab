"""Engine options shared by every subcommand that runs a model (generate, serve, batch, bench)."""

from __future__ import annotations

import argparse


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded random-weight model)")
    g.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    g.add_argument("--memory-fraction", type=float, default=0.9)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, no fused CPU forward")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch step N+1 before reading step N's tokens (default: on for CUDA)")
    g.add_argument("--structured-outputs-backend", default="llguidance",
                   choices=["llguidance", "xgrammar"],
                   help="grammar backend for response_format / structured outputs (xgrammar: an extra)")
    g.add_argument("--device", default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many ranks, one process each (gloo on CPU, NCCL on CUDA)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "block_size": args.block_size,
        "num_kv_blocks": args.num_kv_blocks,
        "memory_fraction": args.memory_fraction,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": not args.no_prefix_caching,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.enforce_eager,
        "device": args.device,
        "seed": args.seed,
        "tensor_parallel_size": args.tensor_parallel_size,
        "async_scheduling": args.async_scheduling,
        "structured_outputs_backend": args.structured_outputs_backend,
    }
