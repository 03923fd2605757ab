"""Offline throughput: llmserve vs transformers' static `generate` and `generate_batch`.

Same checkpoint, same prompts, same output lengths (ignore_eos), measured in one run. Prints a
table and JSON (output tok/s, ratios, peak memory).

    python benchmarks/throughput.py                      # default CPU workload (~20M Llama)
    python benchmarks/throughput.py --model-preset qwen3-0.6b --num-prompts 256 \\
        --input-len-range 100 1024 --output-len-range 100 1024 --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    # ~20M parameters: 4 layers, hidden 256, 8 heads, 2 KV heads, vocab 32000 (untied).
    "llama-20m": dict(
        architecture="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048,
    ),
    # Qwen3-0.6B's shape with random weights.
    "qwen3-0.6b": dict(
        architecture="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=True, initializer_range=0.02,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="existing HF checkpoint directory (else a preset is built)")
    p.add_argument("--model-preset", default="llama-20m", choices=sorted(PRESETS))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len-range", type=int, nargs=2, default=[16, 256])
    p.add_argument("--output-len-range", type=int, nargs=2, default=[128, 128])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-batch-size", type=int, default=64, help="padded batch size for HF generate")
    p.add_argument("--skip", action="append", default=[], choices=["llmserve", "hf-static", "hf-cb"])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="llmserve ranks (one process each)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


def make_workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
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


def run_llmserve(args, path, prompts, out_lens, device) -> dict:
    from llmserve import LLM, SamplingParams

    llm = LLM(path, dtype=args.dtype, device=str(device), max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
              seed=args.seed, tensor_parallel_size=args.tensor_parallel_size)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync(device)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(out_lens), "llmserve produced a different number of tokens"
    result = {"elapsed_s": elapsed, "output_tokens": produced, "peak_memory_mib": peak_memory_mib(device),
              "num_preemptions": llm.stats()["num_preemptions"]}
    del llm
    return result


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
    produced = sum(min(len(r.generated_tokens), n) for r, n in zip(_ordered(results, len(prompts)), out_lens))
    return {"elapsed_s": elapsed, "output_tokens": produced, "peak_memory_mib": peak_memory_mib(device),
            "mode": mode}


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = device_of(args)
    path = checkpoint(args)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    prompts, out_lens = make_workload(args, min(vocab, 32000))
    runs: dict[str, dict] = {}

    def record(name: str, run: dict) -> None:
        run["output_tok_s"] = run["output_tokens"] / run["elapsed_s"]
        runs[name] = run
        if args.json:  # after every engine, so a run cut short by a timeout keeps what finished
            Path(args.json).write_text(json.dumps(summary(args, device, out_lens, runs), indent=2))

    if "llmserve" not in args.skip:
        record("llmserve", run_llmserve(args, path, prompts, out_lens, device))
    if not {"hf-static", "hf-cb"} <= set(args.skip):
        model = load_hf(path, args, device)
        if "hf-cb" not in args.skip:
            record("hf_generate_batch", run_hf_generate_batch(args, model, prompts, out_lens, device))
        if "hf-static" not in args.skip:
            record("hf_generate", run_hf_static(args, model, prompts, out_lens, device))
    result = summary(args, device, out_lens, runs)
    print_table(result)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def summary(args, device, out_lens: list[int], runs: dict[str, dict]) -> dict:
    result = {
        "benchmark": "throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model or args.model_preset, "dtype": args.dtype, "device": str(device),
        "workload": {"num_prompts": args.num_prompts, "input_len_range": args.input_len_range,
                     "output_len_range": args.output_len_range, "total_output_tokens": sum(out_lens),
                     "seed": args.seed},
        "hardware": hardware(), "runs": runs,
    }
    if "llmserve" in runs:
        base = runs["llmserve"]["output_tok_s"]
        result["ratios"] = {f"llmserve_vs_{k}": base / v["output_tok_s"] for k, v in runs.items() if k != "llmserve"}
    return result


def print_table(result: dict) -> None:
    print(f"\n{'engine':<20} {'output tok/s':>14} {'elapsed s':>10} {'tokens':>8} {'peak MiB':>10}")
    for name, r in result["runs"].items():
        print(f"{name:<20} {r['output_tok_s']:>14.1f} {r['elapsed_s']:>10.2f} {r['output_tokens']:>8} {r['peak_memory_mib']:>10.0f}")
    for name, ratio in result.get("ratios", {}).items():
        print(f"{name}: {ratio:.2f}x")
    print()


if __name__ == "__main__":
    sys.exit(main())
