#!/usr/bin/env bash
# Online serving on one GPU: llmserve's server against `transformers serve --continuous-batching`,
# same checkpoint, same load (benchmarks/serving.py: random prompts of 128 tokens, 128 new
# tokens, greedy, all requests at once, at each concurrency), one server at a time. Called by
# benchmarks/gpu_check.sh; runs on its own too:
#
#   CKPT=/path/to/checkpoint OUT=/some/dir bash benchmarks/gpu_serving.sh
#   SERVING_PROMPTS=128 SERVING_CONCURRENCY="16 64" SERVING_RUN_TIMEOUT_S=60 DTYPE=bfloat16
#   SERVING_BUDGET_S=210   # the whole script: runs are shortened or skipped to end in time
#
# The GPU machine has no FastAPI stack and no registry: the wheels fetched by
# benchmarks/fetch_gpu_wheels.sh (WHEELS, default benchmarks/wheels/py312, carried to the
# machine) are installed with --no-deps into a temporary folder put on PYTHONPATH, for this
# script only. Without wheels, the machine's own packages must do.
# Writes SERVING_DIR (default $OUT/serving)/<engine>_c<concurrency>.json, the servers' logs,
# and SERVING_JSON (default $OUT/serving.json, a summary). SERVING_ENGINES picks the servers
# (default "llmserve transformers"). Exit status: 0 if every run finished, 3 if the wheels
# could not be installed, 1 if any server or run failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
CKPT=${CKPT:?set CKPT to a Hugging Face checkpoint directory}
WHEELS=${WHEELS:-benchmarks/wheels/py312}
N=${SERVING_PROMPTS:-128}
CONCURRENCY=${SERVING_CONCURRENCY:-16 64}
RUN_TIMEOUT=${SERVING_RUN_TIMEOUT_S:-60}
START_TIMEOUT=${SERVING_START_TIMEOUT_S:-120}
DEADLINE=$((SECONDS + ${SERVING_BUDGET_S:-600}))
DTYPE=${DTYPE:-bfloat16}
ENGINES=${SERVING_ENGINES:-llmserve transformers}
DIR=${SERVING_DIR:-$OUT/serving}
SUMMARY=${SERVING_JSON:-$OUT/serving.json}
SITE=$(mktemp -d)
mkdir -p "$DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
# transformers serve lists the hub cache on /v1/models (the readiness probe) and fails if the
# folder is missing; an empty one of our own answers.
export HF_HUB_CACHE="$SITE/hf-hub-cache"
mkdir -p "$HF_HUB_CACHE"
status=0
server=""

stop_server() {
  if [[ -n "$server" ]]; then
    kill "$server" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$server" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$server" 2>/dev/null
    wait "$server" 2>/dev/null
    server=""
  fi
}
trap 'stop_server; rm -rf "$SITE"' EXIT
trap 'exit 143' TERM INT  # so that the EXIT trap stops a running server

# left_for STOP_RESERVE_S: seconds left before the deadline, keeping time to stop a server.
left_for() { echo $((DEADLINE - SECONDS - $1)); }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "gpu_serving: installing $(compgen -G "$WHEELS/*.whl" | wc -l) wheels from $WHEELS"
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE/site" "$WHEELS"/*.whl || exit 3
elif ! "$PY" -c "import fastapi, uvicorn, sse_starlette, openai" 2>/dev/null; then
  echo "gpu_serving: no FastAPI stack here and no wheels in $WHEELS" \
    "(run benchmarks/fetch_gpu_wheels.sh, then carry benchmarks/wheels)" >&2
  exit 3
fi
export PYTHONPATH="$PWD:$SITE/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import fastapi, uvicorn, sse_starlette, aiohttp, openai, grpc_reflection" || exit 3

# min_start: the start timeout, shortened to leave time for a run and a stop.
min_start() {
  local left
  left=$(left_for 60)
  echo $((left < START_TIMEOUT ? left : START_TIMEOUT))
}

# wait_up URL SECONDS: poll until the server answers (or its process died).
wait_up() {
  local t0=$SECONDS
  while ((SECONDS - t0 < $2)); do
    "$PY" - "$1" <<'EOF' 2>/dev/null && return 0
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()
EOF
    kill -0 "$server" 2>/dev/null || { echo "gpu_serving: the server exited" >&2; return 1; }
    sleep 1
  done
  echo "gpu_serving: $1 did not answer within $2 s" >&2
  return 1
}

# bench ENGINE PORT MODEL_FIELD: one serving.py run per concurrency against the running server.
bench() {
  local c rc limit
  for c in $CONCURRENCY; do
    limit=$(left_for 30)
    limit=$((limit < RUN_TIMEOUT ? limit : RUN_TIMEOUT))
    if ((limit < 10)); then
      echo "gpu_serving: no time left for $1 at concurrency $c"
      echo "{\"error\": \"skipped: out of time budget\"}" >"$DIR/$1_c$c.error.json"
      status=1
      continue
    fi
    echo "== $1, concurrency $c, $N requests (timeout ${limit}s)"
    timeout --signal=TERM --kill-after=5 "$limit" "$PY" benchmarks/serving.py \
      --base-url "http://127.0.0.1:$2" --model "$3" --tokenizer "$CKPT" --num-prompts "$N" \
      --input-len 128 --output-len 128 --max-concurrency "$c" --seed 0 \
      --result-json "$DIR/$1_c$c.json" >"$DIR/$1_c$c.log" 2>&1
    rc=$?
    grep -E "Output token|P90 TTFT|Successful|Failed" "$DIR/$1_c$c.log"
    if ((rc != 0)); then
      echo "gpu_serving: $1 at concurrency $c exited $rc (124: over ${limit}s)"
      tail -n 5 "$DIR/$1_c$c.log"
      echo "{\"error\": \"exit $rc\", \"timeout_s\": $limit}" >"$DIR/$1_c$c.error.json"
      status=1
    fi
  done
}

# Half of the time left: llmserve's share when both servers run (start, runs, stop).
half_deadline() { echo $(((DEADLINE - SECONDS) / 2)); }

run_llmserve() {
  echo "== llmserve serve ($DTYPE)"
  local saved_deadline=$DEADLINE
  # Half of what is left when transformers comes next (it is the slower of the two).
  if [[ " $ENGINES " == *" transformers "* ]]; then DEADLINE=$((SECONDS + $(half_deadline))); fi
  "$PY" -m llmserve.cli serve --model "$CKPT" --dtype "$DTYPE" --port 8601 --trace-db off \
    --drain-timeout 2 --log-level warning >"$DIR/llmserve_server.log" 2>&1 &
  server=$!
  if wait_up http://127.0.0.1:8601/health "$(min_start)"; then
    bench llmserve 8601 "$(basename "$CKPT")"
  else
    tail -n 20 "$DIR/llmserve_server.log"
    status=1
  fi
  stop_server
  DEADLINE=$saved_deadline
}

run_transformers() {
  echo "== transformers serve --continuous-batching ($DTYPE)"
  "$PY" -m transformers.cli.transformers serve "$CKPT" --continuous-batching --dtype "$DTYPE" \
    --host 127.0.0.1 --port 8602 >"$DIR/transformers_server.log" 2>&1 &
  server=$!
  if wait_up http://127.0.0.1:8602/v1/models "$(min_start)"; then
    bench transformers 8602 "$CKPT"
  else
    tail -n 20 "$DIR/transformers_server.log"
    status=1
  fi
  stop_server
}

for engine in $ENGINES; do
  case $engine in
    llmserve) run_llmserve ;;
    transformers) run_transformers ;;
    *) echo "gpu_serving: unknown engine $engine (llmserve, transformers)" >&2; status=1 ;;
  esac
done

"$PY" - "$DIR" "$SUMMARY" <<'EOF'
import glob, json, os, sys
src, dst = sys.argv[1], sys.argv[2]
keys = ("completed", "failed", "errors", "duration_s", "output_throughput", "request_throughput",
        "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
runs = {}
for path in sorted(glob.glob(os.path.join(src, "*_c*.json"))):
    name = os.path.basename(path)[: -len(".json")]
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as exc:
        data = {"error": f"unreadable: {exc}"}
    runs[name] = data if "error" in data else {k: data.get(k) for k in keys}
summary = {"num_prompts": int(os.environ.get("SERVING_PROMPTS", "128")), "runs": runs}
for name, run in runs.items():
    if name.startswith("llmserve_c") and not name.endswith(".error"):
        peer = runs.get(name.replace("llmserve", "transformers", 1), {})
        if run.get("output_throughput") and peer.get("output_throughput"):
            c = name.rsplit("_c", 1)[1]
            summary[f"output_tok_s_ratio_c{c}"] = run["output_throughput"] / peer["output_throughput"]
with open(dst, "w") as f:
    json.dump(summary, f, indent=2)
for name, run in runs.items():
    if "error" in run:
        print(f"{name:<20} {run['error']}")
    else:
        print(f"{name:<20} {run['output_throughput']:>9.1f} out tok/s  TTFT p90 "
              f"{run['ttft_ms']['p90']:>8.1f} ms  TPOT p50 {run['tpot_ms']['p50']:>7.2f} ms  "
              f"{run['completed']} ok, {run['failed']} failed")
for key, value in summary.items():
    if key.startswith("output_tok_s_ratio"):
        print(f"{key}: {value:.2f}x")
EOF
exit $status
