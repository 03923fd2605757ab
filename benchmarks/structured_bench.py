"""Cost of structured outputs: per-step grammar-mask cost and the TTFT a schema compile adds.

1. Decode step time at 1, 16 and 64 requests, all constrained by a JSON schema vs all
   unconstrained (same prompts, lengths and sampling), A/B interleaved over rounds; medians.
   The schema keeps every row inside a long string (most of the vocabulary allowed: the
   expensive kind of mask) for the whole measured window. The host time of the mask fill alone
   is reported too.
2. TTFT of one request alone: unconstrained, with a schema never seen (cold compile) and with
   a schema compiled before (cache hit); interleaved, medians.

The model is a small random Qwen3 (hidden 256, 4 layers) with the cl100k tokenizer (100k
vocabulary, so the masks are realistic). Timings on a shared machine are noisy: compare the
rounds' spread.

    python benchmarks/structured_bench.py [--rounds 5] [--steps 24] [--batches 1,16,64]
                                          [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
)
LONG_STRING = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 2000, "maxLength": 4000}},
    "required": ["text"],
}
PROMPT = [791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13]


def checkpoint(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from llmserve.models.random_checkpoint import build_random_checkpoint

    path = Path(tempfile.gettempdir()) / "llmserve-bench-structured-qwen3-cl100k"
    if not (path / "config.json").exists():
        build_random_checkpoint(path, "qwen3", seed=0, dtype="float32", tokenizer="cl100k", **SHAPE)
    return str(path)


class MaskTimer:
    """Wraps grammar_masks (run on the mask thread during the forward) to record its time."""

    def __init__(self) -> None:
        from llmserve.structured import masks

        self.inner, self.seconds = masks.grammar_masks, []
        masks.grammar_masks = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)


def decode_step_times(engine, batch: int, steps: int, constrained: bool, tag: str) -> list[float]:
    """Seconds per decode step once every request is past its prefill."""
    from llmserve import SamplingParams
    from llmserve.sampling_params import StructuredOutputsParams

    so = StructuredOutputsParams(json=LONG_STRING) if constrained else None
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=steps + 8, ignore_eos=True,
                            structured_outputs=so)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", PROMPT + [100 + i], params)
    while engine.scheduler.waiting or engine.structured.waiting or any(
            r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished_requests():
        engine.step()
    return times


def ttft(engine, params, tag: str) -> float:
    start = time.perf_counter()
    engine.add_request(tag, PROMPT, params)
    first = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and any(o.outputs[0].token_ids for o in outs):
            first = time.perf_counter() - start
            engine.abort_request(tag)
    return first


def bench_steps(engine, args, timer: MaskTimer) -> dict:
    result = {}
    for batch in args.batches:
        per = {"unconstrained": [], "constrained": [], "mask_fill": []}
        for r in range(args.rounds):
            for constrained in (False, True):
                timer.seconds.clear()
                times = decode_step_times(engine, batch, args.steps, constrained, f"b{batch}r{r}{constrained}")
                key = "constrained" if constrained else "unconstrained"
                per[key].append(statistics.median(times))
                if constrained:
                    per["mask_fill"].append(statistics.median(timer.seconds[-args.steps:]))
        u, c = statistics.median(per["unconstrained"]), statistics.median(per["constrained"])
        result[str(batch)] = {
            "unconstrained_ms": round(u * 1e3, 3), "constrained_ms": round(c * 1e3, 3),
            "overhead_pct": round(100 * (c - u) / u, 1),
            # Each round runs both back to back, so its ratio is less exposed to drift.
            "overhead_pct_median_of_rounds": round(100 * (statistics.median(
                cr / ur for cr, ur in zip(per["constrained"], per["unconstrained"])) - 1), 1),
            "mask_fill_ms": round(statistics.median(per["mask_fill"]) * 1e3, 3),
            "rounds_unconstrained_ms": [round(x * 1e3, 2) for x in per["unconstrained"]],
            "rounds_constrained_ms": [round(x * 1e3, 2) for x in per["constrained"]],
        }
    return result


def bench_ttft(engine, args) -> dict:
    from llmserve import SamplingParams
    from llmserve.sampling_params import StructuredOutputsParams

    def schema(i: int) -> dict:  # a distinct schema per i: a cache miss the first time
        props = {f"field_{i}": {"type": "string", "maxLength": 20}, "n": {"type": "integer"},
                 "kind": {"enum": ["a", "b", f"c{i}"]}}
        return {"type": "object", "properties": props, "required": list(props)}

    def params(so=None):
        return SamplingParams(temperature=1.0, max_tokens=4, structured_outputs=so)

    ttft(engine, params(StructuredOutputsParams(json=schema(-1))), "warm")  # first-use costs
    out = {"unconstrained": [], "cold_compile": [], "cached_compile": []}
    for i in range(args.ttft_rounds):
        out["unconstrained"].append(ttft(engine, params(), f"u{i}"))
        out["cold_compile"].append(ttft(engine, params(StructuredOutputsParams(json=schema(i))), f"c{i}"))
        out["cached_compile"].append(ttft(engine, params(StructuredOutputsParams(json=schema(i))), f"h{i}"))
    med = {k: statistics.median(v) for k, v in out.items()}
    return {
        **{f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()},
        "cold_added_ms": round((med["cold_compile"] - med["unconstrained"]) * 1e3, 3),
        "cached_added_ms": round((med["cached_compile"] - med["unconstrained"]) * 1e3, 3),
        "rounds": args.ttft_rounds,
    }


def host_costs(engine, reps: int) -> dict:
    """Medians of the host work a constrained request adds before its first token: the check
    at add time, compiling (cold) or taking the cached grammar plus a matcher copy, and the
    first mask. End-to-end TTFT differences are below this machine's noise; these are not."""
    from llmserve import SamplingParams
    from llmserve.engine.request import Request
    from llmserve.sampling_params import StructuredOutputsParams
    from llmserve.structured.masks import grammar_masks
    from llmserve.structured.spec import GrammarSpec

    sm = engine.structured
    times: dict[str, list[float]] = {"validate": [], "cold_compile": [], "cached_admit": [],
                                     "first_mask": [], "validate_cached": []}
    for i in range(reps):
        schema = {"type": "object", "properties": {f"f{i}": {"type": "string", "maxLength": 20},
                                                   "n": {"type": "integer"}}}
        params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(json=schema))
        t0 = time.perf_counter()
        spec = sm.validate(params)
        t1 = time.perf_counter()
        sm.backend.compile(GrammarSpec(spec.kind, spec.text))  # what the pool does on a miss
        t2 = time.perf_counter()
        sm.compiler.submit(spec).result()  # now cached
        tv = time.perf_counter()
        sm.validate(params)  # a spec that compiled before is not checked again
        tv = time.perf_counter() - tv
        request = Request(f"hc{i}", PROMPT, params, max_tokens=4)
        t3 = time.perf_counter()
        ready = sm.admit(spec, params, [request])
        t4 = time.perf_counter()
        request.num_output_placeholders = 1
        grammar_masks(ready)
        t5 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, tv)):
            times[key].append(dt)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        **{f"{k}_ms": round(v, 3) for k, v in med.items()},
        "cached_total_ms": round(med["validate_cached"] + med["cached_admit"] + med["first_mask"],
                                 3),
        "cold_total_ms": round(med["validate"] + med["cold_compile"] + med["first_mask"], 3),
        "reps": reps,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (else a small cl100k Qwen3 is built)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--ttft-rounds", type=int, default=15)
    p.add_argument("--host-reps", type=int, default=30)
    p.add_argument("--only-host", action="store_true", help="only the compile/first-mask costs")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]

    import torch

    from llmserve.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_args(checkpoint(args), num_kv_blocks=2048, block_size=16,
                                 max_num_seqs=max(args.batches), async_scheduling=False)
    engine.structured.backend.ll_tokenizer  # noqa: B018 - built at start-up, not in a timing
    timer = MaskTimer()
    result = {"torch_threads": torch.get_num_threads(), "vocab_size": engine.runner.vocab_size}
    if not args.only_host:
        result["decode_step"] = bench_steps(engine, args, timer)
        result["ttft"] = bench_ttft(engine, args)
    result["ttft_host_costs"] = host_costs(engine, args.host_reps)
    print(json.dumps(result, indent=2))
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict) -> None:
    if "decode_step" in result:
        print(f"\n{'batch':>6} {'unconstrained ms':>17} {'constrained ms':>15} {'overhead':>9} "
              f"{'per round':>10} {'mask fill ms':>13}")
        for batch, row in result["decode_step"].items():
            print(f"{batch:>6} {row['unconstrained_ms']:>17.2f} {row['constrained_ms']:>15.2f} "
                  f"{row['overhead_pct']:>8.1f}% {row['overhead_pct_median_of_rounds']:>9.1f}% "
                  f"{row['mask_fill_ms']:>13.2f}")
        t = result["ttft"]
        print(f"\nTTFT ms: unconstrained {t['unconstrained_ms']:.2f}, cold compile "
              f"{t['cold_compile_ms']:.2f} (+{t['cold_added_ms']:.2f}), cached "
              f"{t['cached_compile_ms']:.2f} (+{t['cached_added_ms']:.2f})")
    h = result["ttft_host_costs"]
    print(f"\nhost ms before the first token: validate {h['validate_ms']:.3f}, cold compile "
          f"{h['cold_compile_ms']:.3f}, cached admit {h['cached_admit_ms']:.3f}, first mask "
          f"{h['first_mask_ms']:.3f}, validate when cached {h['validate_cached_ms']:.3f} -> cached {h['cached_total_ms']:.3f}, cold {h['cold_total_ms']:.3f}")


if __name__ == "__main__":
    main()
