"""Small-model CPU decode latency: eager per-op forward vs the fused CPU forward.

On a small Qwen3 (4 layers, hidden 256, fp32, random weights) it measures, for each forward in
interleaved rounds on one engine (the forward is switched with `optimize_for_cpu`):

- single stream: ms per output token after the first (128-token prompt, 256 new tokens, greedy,
  ignore_eos), and the time to the first token;
- 16 streams: output tok/s for 16 such requests at once (prefill included);

with the process CPU time beside each (with --threads 1 it is what a step costs on a machine
that other work shares: wall time then counts the waits for a core). Also the start-up time of a fresh process (engine built, fused forward on, one token generated)
with a cold and then a warm native-kernel cache. Prints a table and JSON.

With `--peers llama.cpp` (after `make peer-llama-cpp`), llama.cpp runs the same prompts in the
same interleaved rounds, on the checkpoint converted to an f32 GGUF, with an f32 KV cache, its
flash attention off (its CPU kernel rounds through f16) and the same thread count, so that its
figures and llmserve's come from the same hour of a shared machine; the JSON gives the ratios and
how many leading greedy tokens agree.

    python benchmarks/cpu_decode_latency.py                  # 3 rounds
    python benchmarks/cpu_decode_latency.py --rounds 5 --threads 2 --json out.json
    python benchmarks/cpu_decode_latency.py --rounds 5 --threads 2 --peers llama.cpp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/peers

SHAPE = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, head_dim=32, vocab_size=32000, max_position_embeddings=2048,
)
MODES = ("eager", "fused")
PEERS = ("llama.cpp",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="existing fp32 checkpoint (else the small Qwen3 is built)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--peers", default="", help=f"comma-separated peers to run beside llmserve: {', '.join(PEERS)}")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    p.add_argument("--startup-probe", default=None, help=argparse.SUPPRESS)  # child process mode
    return p.parse_args(argv)


def checkpoint(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from llmserve.models.random_checkpoint import build_random_checkpoint

    path = Path(tempfile.gettempdir()) / "llmserve-bench-qwen3-small-fp32"
    if not (path / "config.json").exists():
        build_random_checkpoint(path, "qwen3", seed=0, dtype="float32", **SHAPE)
    return str(path)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def run_requests(engine, batch: list[list[int]], new_tokens: int, tag: str) -> dict:
    """Drive the engine until every request is done; return wall times and token counts."""
    from llmserve import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, p in enumerate(batch):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params)
    first: dict[str, float] = {}
    first_cpu: dict[str, float] = {}
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now
                first_cpu[out.request_id] = time.process_time()
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    end, cpu = time.perf_counter(), time.process_time() - cpu_start
    tokens = sum(len(t) for t in done.values())
    assert tokens == len(batch) * new_tokens, f"{tag}: {tokens} tokens, expected {len(batch) * new_tokens}"
    return {"elapsed_s": end - start, "first_token_s": min(first.values()) - start, "end": end,
            "first": first, "tokens": tokens, "token_ids": done, "cpu_s": cpu,
            "decode_cpu_s": time.process_time() - min(first_cpu.values())}


def peer_engines(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    return names


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(args: argparse.Namespace, path: str) -> dict:
    import torch

    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.models.cpu_fast_path import optimize_for_cpu

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine.from_args(path, dtype="float32", max_num_seqs=max(16, args.streams))
    model = engine.runner.model
    vocab = int(model.config["vocab_size"])
    single = prompts(1, args.prompt_len, vocab, seed=1)
    multi = prompts(args.streams, args.prompt_len, vocab, seed=2)
    peers = {}
    if "llama.cpp" in peer_engines(args):
        from peers.llama_cpp_engine import LlamaCppPeer

        peers["llama.cpp"] = LlamaCppPeer(
            path, threads=torch.get_num_threads(), n_seq_max=max(16, args.streams),
            n_ctx=max(16, args.streams) * (args.prompt_len + args.new_tokens))
    engines = [*MODES, *peers]
    for mode in MODES:  # warm both forwards (allocator, kernels built, code paths)
        optimize_for_cpu(model, eager=mode == "eager")
        run_requests(engine, single, 16, f"warm-{mode}")
    results: dict[str, dict[str, list[float]]] = {
        m: {"ms_per_token": [], "cpu_ms_per_token": [], "ttft_ms": [], "tok_s": [], "tok_per_cpu_s": []}
        for m in engines
    }
    tokens: dict[str, dict] = {}
    try:
        for rnd in range(args.rounds):
            order = engines if rnd % 2 == 0 else engines[::-1]  # alternate who goes first
            for name in order:
                if name in peers:
                    figures, one, many = peer_round(peers[name], single, multi, args.new_tokens)
                else:
                    figures, one, many = llmserve_round(engine, model, name, single, multi,
                                                        args.new_tokens, rnd)
                for key, value in figures.items():
                    results[name][key].append(value)
                tokens[name] = {"single": one, "multi": many}
                print(f"round {rnd} {name:9s}: {results[name]['ms_per_token'][-1]:.3f} ms/token, "
                      f"{results[name]['tok_s'][-1]:.0f} tok/s x{args.streams}", file=sys.stderr)
    finally:
        for peer in peers.values():
            peer.close()
    same = tokens["eager"] == tokens["fused"]
    agreement = {}
    for name in peers:
        ours, theirs = tokens["fused"], tokens[name]
        prefixes = [common_prefix(a, b) for a, b in zip([ours["single"], *ours["multi"]],
                                                         [theirs["single"], *theirs["multi"]])]
        agreement[name] = {"identical_sequences": sum(p == args.new_tokens for p in prefixes),
                           "sequences": len(prefixes), "min_common_prefix": min(prefixes),
                           "median_common_prefix": statistics.median(prefixes)}
    return {"results": results, "same_tokens": same, "threads": torch.get_num_threads(),
            "peers": {name: {**peer.info, "idle_cpu_s": peer.idle_cpu_s, "tokens": agreement[name]}
                      for name, peer in peers.items()}}


def round_figures(new_tokens: int, decode_s: float, decode_cpu_s: float, first_token_s: float,
                  tokens: int, elapsed_s: float, cpu_s: float) -> dict[str, float]:
    """One engine's figures of a round: the single stream's decode (after its first token) and
    time to first token, the streams' output tok/s (prefill included)."""
    return {"ms_per_token": 1e3 * decode_s / (new_tokens - 1), "ttft_ms": 1e3 * first_token_s,
            "cpu_ms_per_token": 1e3 * decode_cpu_s / (new_tokens - 1),
            "tok_s": tokens / elapsed_s, "tok_per_cpu_s": tokens / cpu_s}


def llmserve_round(engine, model, mode: str, single, multi, new_tokens: int, rnd: int
                   ) -> tuple[dict, list[int], list[list[int]]]:
    """(figures, the single stream's tokens, each stream's tokens in prompt order)."""
    from llmserve.models.cpu_fast_path import optimize_for_cpu

    on = optimize_for_cpu(model, eager=mode == "eager")
    assert on == (mode == "fused"), f"the fused forward did not switch {'on' if mode == 'fused' else 'off'}"
    one = run_requests(engine, single, new_tokens, f"s-{mode}-{rnd}")
    rid = next(iter(one["first"]))
    many = run_requests(engine, multi, new_tokens, f"m-{mode}-{rnd}")
    order = sorted(many["token_ids"], key=lambda r: int(r.rsplit("-", 1)[1]))
    figures = round_figures(new_tokens, one["end"] - one["first"][rid], one["decode_cpu_s"],
                            one["first_token_s"], many["tokens"], many["elapsed_s"], many["cpu_s"])
    return figures, one["token_ids"][rid], [many["token_ids"][r] for r in order]


def peer_round(peer, single, multi, new_tokens: int) -> tuple[dict, list[int], list[list[int]]]:
    """As `llmserve_round`, from the peer's worker."""
    one = peer.run(single, new_tokens)
    many = peer.run(multi, new_tokens)
    tokens = sum(len(t) for t in many["token_ids"])
    assert tokens == len(multi) * new_tokens, f"peer: {tokens} tokens, expected {len(multi) * new_tokens}"
    figures = round_figures(new_tokens, one["decode_s"], one["decode_cpu_s"], one["first_token_s"],
                            tokens, many["elapsed_s"], many["cpu_s"])
    return figures, one["token_ids"][0], many["token_ids"]


def startup_probe(path: str) -> None:
    """Child process: build the engine, switch on the fused forward, generate one token."""
    start = time.perf_counter()
    from llmserve import LLM, SamplingParams
    from llmserve.models.cpu_fast_path import optimize_for_cpu

    llm = LLM(path, dtype="float32")
    on = optimize_for_cpu(llm.engine.runner.model)
    llm.generate([{"prompt_token_ids": [11, 12, 13]}], SamplingParams(max_tokens=1), use_tqdm=False)
    print(json.dumps({"startup_s": time.perf_counter() - start, "fused": on}))


def startup(path: str) -> dict:
    """Start-up of a fresh process with an empty native-kernel cache, then with it filled."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, LLMSERVE_CACHE=cache)
        for label in ("cold", "warm"):
            t = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--startup-probe", path], env=env,
                                  capture_output=True, text=True, check=True)
            probe = json.loads(done.stdout.strip().splitlines()[-1])
            assert probe["fused"], "the fused forward did not switch on in the start-up probe"
            out[label] = {"process_s": time.perf_counter() - t, "engine_s": probe["startup_s"]}
    return out


def summarize(measured: dict, start: dict | None, args: argparse.Namespace) -> dict:
    res = measured["results"]
    med = {m: {k: statistics.median(v) for k, v in res[m].items()} for m in res}
    # Per-round ratios too: the rounds are interleaved, so each pair shares its minute.
    vs_peers = {name: {
        "single_ms_ratio_peer_over_fused": med[name]["ms_per_token"] / med["fused"]["ms_per_token"],
        "multi_tok_s_ratio_fused_over_peer": med["fused"]["tok_s"] / med[name]["tok_s"],
        "single_ms_ratio_per_round": [p / f for p, f in zip(res[name]["ms_per_token"], res["fused"]["ms_per_token"])],
        "multi_tok_s_ratio_per_round": [f / p for p, f in zip(res[name]["tok_s"], res["fused"]["tok_s"])],
    } for name in measured["peers"]}
    return {
        "shape": SHAPE if not args.model else {"model": args.model},
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "streams": args.streams,
        "rounds": args.rounds, "threads": measured["threads"], "load_avg": os.getloadavg(),
        "median": med, "all": res, "same_tokens_eager_vs_fused": measured["same_tokens"],
        "speedup_single": med["eager"]["ms_per_token"] / med["fused"]["ms_per_token"],
        "speedup_single_cpu": med["eager"]["cpu_ms_per_token"] / med["fused"]["cpu_ms_per_token"],
        "speedup_multi": med["fused"]["tok_s"] / med["eager"]["tok_s"],
        "startup": start,
        "peers": measured["peers"], "vs_peers": vs_peers,
    }


def print_table(summary: dict) -> None:
    med, allr = summary["median"], summary["all"]
    print(f"\nsmall-model CPU decode ({summary['threads']} threads, {summary['rounds']} interleaved rounds, "
          f"medians [min-max], load avg {summary['load_avg'][0]:.1f})")
    print(f"{'forward':9s} {'1-stream ms/token':>26s} {'(CPU ms)':>9s} {'TTFT ms':>9s} "
          f"{summary['streams']:>4d}-stream tok/s {'(per CPU s)':>12s}")
    for m in allr:
        r = allr[m]
        print(f"{m:9s} {med[m]['ms_per_token']:9.3f} [{min(r['ms_per_token']):.3f}-{max(r['ms_per_token']):.3f}]"
              f" {med[m]['cpu_ms_per_token']:9.3f} {med[m]['ttft_ms']:9.1f}   "
              f"{med[m]['tok_s']:6.0f} [{min(r['tok_s']):.0f}-{max(r['tok_s']):.0f}] {med[m]['tok_per_cpu_s']:12.0f}")
    print(f"fused vs eager: {summary['speedup_single']:.2f}x single stream, {summary['speedup_multi']:.2f}x "
          f"{summary['streams']} streams; same greedy tokens: {summary['same_tokens_eager_vs_fused']}")
    for name, v in summary["vs_peers"].items():
        agree = summary["peers"][name]["tokens"]
        print(f"vs {name}: its ms/token / ours {v['single_ms_ratio_peer_over_fused']:.2f}x, our {summary['streams']}-stream "
              f"tok/s / its {v['multi_tok_s_ratio_fused_over_peer']:.2f}x; identical greedy sequences "
              f"{agree['identical_sequences']}/{agree['sequences']} (shortest common prefix {agree['min_common_prefix']})")
    if summary["startup"]:
        for label, s in summary["startup"].items():
            print(f"start-up, {label} kernel cache: {s['process_s']:.1f} s process ({s['engine_s']:.1f} s engine)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.startup_probe:
        startup_probe(args.startup_probe)
        return
    path = checkpoint(args)
    start = None if args.skip_startup else startup(path)
    summary = summarize(measure(args, path), start, args)
    print(json.dumps(summary, indent=2))
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
