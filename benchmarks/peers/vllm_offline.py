"""vLLM's offline `LLM.generate` as a long-lived worker, for benchmarks/throughput.py.

Runs with vLLM's virtualenv (`make peer-vllm`), started once per benchmark run because vLLM
takes about a minute to start on CPU (torch.compile); each round then sends it the same token ids
the other engines get. One JSON object per line:

    stdin:  {"prompts": [[ids...], ...], "max_tokens": [n, ...], "return_tokens": K}
    stdout: {"ready": true, "startup_s": ..., "versions": {...}}        once, after start-up
            {"elapsed_s": ..., "output_tokens": ..., "token_ids": [[...] x K], "rss_mib": ...}

The protocol has stdout to itself: everything else that writes to fd 1 (vLLM's logs, its
engine-core and worker processes) is sent to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

T0 = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vllm_launcher import alias_vllm_distribution  # noqa: E402

alias_vllm_distribution()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    return p.parse_args(argv)


def process_tree_rss_mib() -> float:
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def build(args: argparse.Namespace):
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, seed=args.seed, skip_tokenizer_init=True,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    # The same warm-up llmserve gets in throughput.py: one short request.
    llm.generate([{"prompt_token_ids": list(range(10, 18))}],
                 SamplingParams(max_tokens=4, temperature=0.0, detokenize=False), use_tqdm=False)
    return llm


def run(llm, request: dict) -> dict:
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
              for n in request["max_tokens"]]
    prompts = [{"prompt_token_ids": p} for p in request["prompts"]]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    k = request.get("return_tokens", 0)
    return {"elapsed_s": elapsed,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "token_ids": [list(o.outputs[0].token_ids) for o in outs[:k]],
            "rss_mib": process_tree_rss_mib()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    llm = build(args)
    import torch
    import vllm

    proto.write(json.dumps({"ready": True, "startup_s": time.perf_counter() - T0,
                            "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
                            "torch_threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        if line.strip():
            proto.write(json.dumps(run(llm, json.loads(line))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
