"""Router overhead on loopback: the same request sent straight to a backend and through the router.

Starts a fake OpenAI backend and a router (each in its own process), then sends N sequential
requests alternately direct and through the router, so both see the same machine load. Prints a
JSON line and a table with p50 / p90 / p99 of each path; overhead = router p50 - direct p50.
Target: p50 overhead < 2 ms.

    python benchmarks/router_overhead.py [--requests 400] [--stream] [--policy least_outstanding]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "tests" / "routing" / "fake_openai_backend.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


def _quantiles(samples: list[float]) -> dict[str, float]:
    data = sorted(samples)
    pick = lambda q: data[min(len(data) - 1, int(q * len(data)))] * 1000  # noqa: E731
    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99)}


def measure(direct: str, routed: str, n: int, stream: bool) -> dict[str, dict[str, float]]:
    body = {"model": "bench", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8, "stream": stream}
    times: dict[str, list[float]] = {"direct": [], "router": []}
    with httpx.Client(timeout=30, trust_env=False) as client:
        for i in range(n + 20):
            for name, base in (("direct", direct), ("router", routed)):
                t0 = time.perf_counter()
                with client.stream("POST", base + "/v1/chat/completions", json=body) as resp:
                    for _ in resp.iter_raw():
                        pass
                    if resp.status_code != 200:
                        raise RuntimeError(f"{name}: HTTP {resp.status_code}")
                if i >= 20:  # warm-up: connections, imports, caches
                    times[name].append(time.perf_counter() - t0)
    return {k: _quantiles(v) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--stream", action="store_true", help="streamed responses (SSE)")
    parser.add_argument("--policy", default="least_outstanding")
    parser.add_argument("--no-trace-db", action="store_true",
                        help="run the router without a trace ledger (isolates its cost)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []
    try:
        backend = subprocess.Popen([sys.executable, str(BACKEND), "--version", "v1"],
                                   stdout=subprocess.PIPE, text=True, env=env)
        procs.append(backend)
        direct = f"http://127.0.0.1:{backend.stdout.readline().split()[1]}"
        port = _free_port()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "router.yaml"
            trace_db = None if args.no_trace_db else str(Path(tmp) / "traces.db")
            cfg.write_text(json.dumps({  # JSON is YAML
                "port": port, "trace_db": trace_db,
                "models": {"bench": {"policy": args.policy, "primary": "v1", "deployments": {
                    "v1": {"owner": "bench", "replicas": [direct]}}}}}))
            router = subprocess.Popen([sys.executable, "-m", "llmserve.cli", "router", "--config",
                                       str(cfg), "--log-level", "warning"], env=env, cwd=ROOT)
            procs.append(router)
            routed = f"http://127.0.0.1:{port}"
            _wait(direct, backend)
            _wait(routed, router)
            result = measure(direct, routed, args.requests, args.stream)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    overhead = result["router"]["p50_ms"] - result["direct"]["p50_ms"]
    out = {"benchmark": "router_overhead", "requests": args.requests, "stream": args.stream,
           "policy": args.policy, "trace_db": not args.no_trace_db, **{f"{k}_{m}": round(v, 3) for k, d in result.items()
                                     for m, v in d.items()},
           "overhead_p50_ms": round(overhead, 3), "target_ms": 2.0, "pass": overhead < 2.0}
    print(json.dumps(out))
    print(f"\n{'path':8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for name, q in result.items():
        print(f"{name:8} {q['p50_ms']:8.2f} {q['p90_ms']:8.2f} {q['p99_ms']:8.2f}")
    print(f"overhead p50: {overhead:.2f} ms (target < 2 ms) -> {'PASS' if overhead < 2 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
