"""Single-stream decode latency: llmserve against transformers' `generate`, batch 1.

One request at a time, greedy, a random prompt of `--prompt-len` tokens. The decode cost per
token is (time for N new tokens - time for 1 new token) / (N - 1), so the prefill and the
first token are left out. transformers is much slower per token, so it decodes fewer tokens
(`--hf-new-tokens`). Every run uses a fresh prompt, so no prefix cache helps either side.
Prints a table and JSON.

    python benchmarks/single_stream.py --model CKPT --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=512, help="llmserve's new tokens per run")
    p.add_argument("--hf-new-tokens", type=int, default=64, help="transformers' new tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median)")
    p.add_argument("--skip", action="append", default=[], choices=["llmserve", "transformers"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None,
                   help="also write the JSON result here (after each engine)")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.hf_new_tokens < 2:
        p.error("--new-tokens and --hf-new-tokens must be >= 2")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ms_per_token(
    generate: Callable[[list[int], int], None], prompts: list[list[int]], new_tokens: int,
    repeats: int, device: torch.device,
) -> dict:
    """Median decode ms/token from paired runs (1 token, then `new_tokens`) on fresh prompts."""
    generate(prompts[0], 4)  # warm-up: compiles, graph capture, allocator
    firsts, fulls, per_token = [], [], []
    for r in range(repeats):
        timings = []
        for prompt, n in ((prompts[1 + 2 * r], 1), (prompts[2 + 2 * r], new_tokens)):
            sync(device)
            start = time.perf_counter()
            generate(prompt, n)
            sync(device)
            timings.append(time.perf_counter() - start)
        firsts.append(timings[0])
        fulls.append(timings[1])
        per_token.append((timings[1] - timings[0]) / (new_tokens - 1) * 1e3)
    return {"ms_per_token": statistics.median(per_token), "ms_per_token_runs": per_token,
            "new_tokens": new_tokens, "first_token_s": statistics.median(firsts),
            "total_s": statistics.median(fulls)}


def llmserve_generate(args: argparse.Namespace, device: torch.device):
    from llmserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=str(device), seed=args.seed)

    def generate(prompt: list[int], n: int) -> None:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        if len(out[0].outputs[0].token_ids) != n:
            raise RuntimeError(f"llmserve made {len(out[0].outputs[0].token_ids)} tokens, not {n}")

    return generate


def transformers_generate(args: argparse.Namespace, device: torch.device):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    model = model.to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.inference_mode()
    def generate(prompt: list[int], n: int) -> None:
        ids = torch.tensor([prompt], device=device)
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=pad)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=cfg)
        if out.shape[1] - ids.shape[1] != n:
            raise RuntimeError(f"transformers made {out.shape[1] - ids.shape[1]} tokens, not {n}")

    return generate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, min(vocab, 32000) - 10) for _ in range(args.prompt_len)]
               for _ in range(1 + 2 * args.repeats)]
    result: dict = {
        "benchmark": "single_stream", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model, "dtype": args.dtype, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "prompt_len": args.prompt_len, "runs": {},
    }

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    engines = (("llmserve", llmserve_generate, args.new_tokens),
               ("transformers", transformers_generate, args.hf_new_tokens))
    for name, build, new_tokens in engines:
        if name in args.skip:
            continue
        result["runs"][name] = decode_ms_per_token(build(args, device), prompts, new_tokens,
                                                   args.repeats, device)
        save()
        print(json.dumps({name: result["runs"][name]}), flush=True)
        gc.collect()  # the engine's memory (weights, KV cache) goes before the next one loads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    runs = result["runs"]
    if "llmserve" in runs and "transformers" in runs:
        result["speedup_vs_transformers"] = (runs["transformers"]["ms_per_token"]
                                             / runs["llmserve"]["ms_per_token"])
    save()
    print(f"\n{'engine':<14} {'ms/token':>9} {'new tokens':>10} {'first token s':>14}")
    for name, r in runs.items():
        print(f"{name:<14} {r['ms_per_token']:>9.3f} {r['new_tokens']:>10} "
              f"{r['first_token_s']:>14.3f}")
    if "speedup_vs_transformers" in result:
        ratio = result["speedup_vs_transformers"]
        print(f"transformers ms/token over llmserve ms/token: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
