"""Online serving benchmark for any OpenAI-compatible server (streaming), like `vllm bench serve`.

Random prompts of `--input-len` tokens arrive as a Poisson process at `--request-rate` (or all at
once), at most `--max-concurrency` in flight. Reports TTFT, TPOT, ITL and end-to-end latency
(mean, p50, p90, p99), output tokens/s, requests/s and goodput under SLOs, as a table and JSON.

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --model tiny \
        --tokenizer /path/to/checkpoint --num-prompts 200 --input-len 128 --output-len 128 \
        --max-concurrency 16 --goodput ttft:500 tpot:50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import aiohttp

_WORDS = ("time person year way day thing man world life hand part child eye woman place work "
          "week case point number group problem fact river city garden market window story "
          "music paper water light money night table family school answer system program").split()


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def make_prompts(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(prompt text, output length) pairs; lengths vary by +-range_ratio around the targets."""
    rng = random.Random(args.seed)
    tokenizer = _load_tokenizer(args.tokenizer)
    pieces = None
    if tokenizer is not None:
        # Tokens that decode to clean text on their own, so prompts re-tokenize to about length.
        specials = getattr(tokenizer, "special_token_ids", frozenset())
        pieces = [t for t in range(tokenizer.vocab_size) if t not in specials
                  and tokenizer.decode_token(t).isprintable()
                  and not tokenizer.decode_token(t).startswith("bytes:")]
    prompts = []
    for _ in range(args.num_prompts):
        n_in = _vary(rng, args.input_len, args.range_ratio)
        n_out = _vary(rng, args.output_len, args.range_ratio)
        if pieces:
            text = tokenizer.decode([rng.choice(pieces) for _ in range(n_in)])
        else:
            text = " ".join(rng.choice(_WORDS) for _ in range(n_in))
        prompts.append((text, n_out))
    return prompts


def _vary(rng: random.Random, target: int, ratio: float) -> int:
    low, high = max(1, int(target * (1 - ratio))), max(1, int(target * (1 + ratio)))
    return rng.randint(low, high)


def _load_tokenizer(path: str | None):
    if not path:
        return None
    from llmserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def request_body(args: argparse.Namespace, prompt: str, max_tokens: int) -> dict:
    body: dict = {"model": args.model, "max_tokens": max_tokens, "stream": True,
                  "temperature": args.temperature,
                  "stream_options": {"include_usage": True}}
    if args.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM / llmserve extension; other servers may reject it
    return body


def _delta_text(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def one_request(session: aiohttp.ClientSession, args: argparse.Namespace, prompt: str,
                      max_tokens: int) -> Result:
    result = Result()
    start = time.perf_counter()
    last = start
    chunks_with_text = 0
    try:
        async with session.post(args.base_url.rstrip("/") + args.endpoint,
                                json=request_body(args, prompt, max_tokens)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return result
            async for line in resp.content:  # one SSE line at a time
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                now = time.perf_counter()
                if _delta_text(chunk):
                    if chunks_with_text == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks_with_text += 1
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks_with_text
    result.ok = chunks_with_text > 0
    if not result.ok:
        result.error = "no output"
    return result


async def run_load(args: argparse.Namespace, prompts: list[tuple[str, int]]
                   ) -> tuple[list[Result], float]:
    rng = random.Random(args.seed + 1)
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # aiohttp, as `vllm bench serve` uses: at thousands of SSE events per second, the load
    # generator shares the machine with the server it measures; httpx cost about 1.8x the
    # CPU per event.
    async with aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=args.timeout),
            connector=aiohttp.TCPConnector(limit=0), read_bufsize=1 << 16) as session:
        warm = await one_request(session, args, prompts[0][0], 4)
        if not warm.ok:
            raise SystemExit(f"warm-up request failed: {warm.error}")

        async def limited(prompt: str, n_out: int) -> Result:
            async with limit:
                return await one_request(session, args, prompt, n_out)

        tasks = []
        start = time.perf_counter()
        for prompt, n_out in prompts:
            tasks.append(asyncio.ensure_future(limited(prompt, n_out)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(v * scale for v in values)

    def pct(p: float) -> float:
        k = (len(ordered) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": statistics.fmean(ordered), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(args: argparse.Namespace, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    slo = dict(args.goodput or [])
    good = [r for r in ok if r.ttft * 1000 <= slo.get("ttft", float("inf"))
            and r.tpot * 1000 <= slo.get("tpot", float("inf"))
            and r.e2e * 1000 <= slo.get("e2el", float("inf"))]
    return {
        "base_url": args.base_url, "model": args.model, "endpoint": args.endpoint,
        "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "max_concurrency": args.max_concurrency,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed,
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": output,
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "goodput": len(good) / duration if args.goodput else None,
        "slo_ms": slo or None,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok if r.output_tokens > 1]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2el_ms": _stats([r.e2e for r in ok]),
    }


def print_table(s: dict) -> None:
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Total input tokens", s["total_input_tokens"]),
            ("Total output tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}")]
    if s["goodput"] is not None:
        rows.append(("Goodput (req/s)", f"{s['goodput']:.2f}"))
    for key, name in [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                      ("e2el_ms", "E2E latency")]:
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{stat.capitalize()} {name} (ms)", f"{s[key][stat]:.2f}"))
    print(f"{' Serving Benchmark Result ':=^52}")
    for name, value in rows:
        print(f"{name:<40}{value:>12}")
    for err in s["errors"]:
        print(f"error: {err}")
    print("=" * 52)


def _slo(text: str) -> tuple[str, float]:
    name, _, value = text.partition(":")
    if name not in ("ttft", "tpot", "e2el") or not value:
        raise argparse.ArgumentTypeError(f"SLO must be ttft:MS, tpot:MS or e2el:MS, got {text!r}")
    return name, float(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions",
                   choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", required=True, help="the `model` field sent with each request")
    p.add_argument("--tokenizer", default=None,
                   help="checkpoint directory whose tokenizer builds the random prompts")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (vLLM/llmserve extension) so outputs hit output-len")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--goodput", nargs="+", type=_slo, default=None, metavar="NAME:MS")
    p.add_argument("--result-json", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")
    if args.request_rate <= 0 or not 0 <= args.range_ratio < 1:
        p.error("--request-rate must be > 0 and --range-ratio in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = make_prompts(args)
    results, duration = asyncio.run(run_load(args, prompts))
    summary = summarize(args, results, duration)
    print_table(summary)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.result_json:
        with open(args.result_json, "w") as f:
            f.write(text + "\n")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
