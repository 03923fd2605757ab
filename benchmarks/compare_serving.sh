#!/usr/bin/env bash
# Online serving: llmserve vs `transformers serve --continuous-batching` (as shipped, and with one
# torch thread) and, when its virtualenv exists (`make peer-vllm`), vLLM's CPU build, same
# checkpoint, same load, in interleaved rounds: round 1 in the order below, round 2 reversed, and
# so on, so that a machine whose speed drifts between minutes cannot favour either side. Writes
# every round to $RESULTS/<date>-cpu-<tag>.json with the medians (output tok/s, TTFT p50/p90) and
# llmserve's ratio to each peer, and prints the summary table.
#
#   [ENDPOINT=/v1/chat/completions] [ROUNDS=3] [PEERS="transformers vllm"] \
#     bash benchmarks/compare_serving.sh [NUM_PROMPTS] [CONCURRENCY]
#
# llmserve and transformers serve start in each of their turns (seconds). vLLM starts once, before
# round 1, because it takes a minute or more (torch.compile); between its turns its processes are
# stopped (SIGSTOP, then SIGCONT for its turn): idle, they still took ~4 CPU s over the others'
# turns. The CPU seconds they used meanwhile are recorded (peers.vllm-serve in the results). Ports are picked free at start (override: LLMSERVE_PORT, HF_PORT,
# VLLM_PORT); server logs stay in $LOGS (default /tmp/compare-serving-<pid>).
#
# Checkpoint: a random 2-layer, hidden-128 Llama (bpe tokenizer), float32. Greedy decoding, no
# ignore_eos (transformers serve refuses unknown fields), so all servers produce the same tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
N=${1:-200}
C=${2:-16}
ROUNDS=${ROUNDS:-3}
CKPT=${CKPT:-/tmp/llmserve-serving-bench-ckpt}
RESULTS=${RESULTS:-benchmarks/results}
ENDPOINT=${ENDPOINT:-/v1/completions}   # or /v1/chat/completions
TAG=$([ "$ENDPOINT" = /v1/completions ] && echo serving || echo serving-chat)
VLLM_PY=${VLLM_VENV:-.venv-vllm}/bin/python
if [ -z "${PEERS:-}" ]; then
  PEERS=transformers
  [ -x "$VLLM_PY" ] && PEERS="transformers vllm"
fi
# Free ports chosen now (the machine is shared: a fixed port may hold someone else's server).
free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
LLMSERVE_PORT=${LLMSERVE_PORT:-$(free_port)}
HF_PORT=${HF_PORT:-$(free_port)}
VLLM_PORT=${VLLM_PORT:-$(free_port)}
LOGS=${LOGS:-/tmp/compare-serving-$$}   # server logs, kept after the run
mkdir -p "$LOGS"
ROUND_DIR=$(mktemp -d)
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ -f "$CKPT/config.json" ] || "$PY" -c "from llmserve.models.random_checkpoint import build_random_checkpoint as b; b('$CKPT', 'llama', tokenizer='bpe', hidden_size=128, intermediate_size=384)"

pids=()
vllm_pid=
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
stop_vllm() {  # the server and its engine-core/worker processes (its own process group)
  [ -n "$vllm_pid" ] || return 0
  kill -CONT -- "-$vllm_pid" 2>/dev/null || true  # a stopped server would not see the TERM
  kill -TERM -- "-$vllm_pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$vllm_pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$vllm_pid" 2>/dev/null || true
  wait "$vllm_pid" 2>/dev/null || true
  vllm_pid=
}
trap 'cleanup; stop_vllm; rm -rf "$ROUND_DIR"' EXIT

wait_up() {  # URL LOG [SECONDS]
  for _ in $(seq 1 $((${3:-120} * 2))); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "server at $1 did not start; end of $2:" >&2; tail -20 "$2" >&2; return 1
}

run_bench() {  # PORT MODEL NAME ROUND
  "$PY" benchmarks/serving.py --base-url "http://127.0.0.1:$1" --model "$2" --tokenizer "$CKPT" --endpoint "$ENDPOINT" \
    --num-prompts "$N" --input-len 128 --output-len 128 --max-concurrency "$C" --seed 0 \
    --goodput ttft:1000 tpot:100 --result-json "$ROUND_DIR/round-$4-$3.json" | grep -E "Output token|P90 TTFT"
}

vllm_cpu() { "$PY" benchmarks/peers/proc_cpu.py "$vllm_pid"; }
idle_cpu=0

measure() {  # SERVER ROUND
  case "$1" in
    llmserve)
      "$PY" -m llmserve.cli serve --model "$CKPT" --port "$LLMSERVE_PORT" --trace-db off --log-level warning >"$LOGS/llmserve.log" 2>&1 &
      pids+=($!)
      wait_up "http://127.0.0.1:$LLMSERVE_PORT/health" "$LOGS/llmserve.log"
      run_bench "$LLMSERVE_PORT" "$(basename "$CKPT")" llmserve "$2"
      cleanup; pids=() ;;
    transformers-serve|transformers-serve-1thread)
      # The peer as shipped, and again with one torch thread (llmserve's engine also runs one
      # torch thread on 2 cores), so neither side wins by thread settings alone.
      if [ "$1" = transformers-serve-1thread ]; then export OMP_NUM_THREADS=1; fi
      .venv/bin/transformers serve "$CKPT" --continuous-batching --host 127.0.0.1 --port "$HF_PORT" >"$LOGS/$1.log" 2>&1 &
      pids+=($!)
      wait_up "http://127.0.0.1:$HF_PORT/v1/models" "$LOGS/$1.log"
      run_bench "$HF_PORT" "$CKPT" "$1" "$2"
      cleanup; pids=()
      unset OMP_NUM_THREADS
      sleep 2 ;;
    vllm-serve)
      run_bench "$VLLM_PORT" "$CKPT" vllm-serve "$2" ;;
  esac
}

servers=(llmserve)
for peer in $PEERS; do
  case "$peer" in
    transformers) servers+=(transformers-serve transformers-serve-1thread) ;;
    vllm) servers+=(vllm-serve) ;;
    *) echo "unknown peer $peer (transformers, vllm)" >&2; exit 2 ;;
  esac
done

if [[ " ${servers[*]} " == *" vllm-serve "* ]]; then
  echo "--- starting vLLM-CPU once for all rounds (log: $LOGS/vllm-serve.log)"
  started=$(date +%s.%N)
  setsid bash benchmarks/peers/vllm_serve.sh "$CKPT" "$VLLM_PORT" >"$LOGS/vllm-serve.log" 2>&1 &
  vllm_pid=$!
  wait_up "http://127.0.0.1:$VLLM_PORT/v1/models" "$LOGS/vllm-serve.log" 900
  startup_s=$("$PY" -c "import time; print(round(time.time() - $started, 1))")
  echo "vLLM-CPU up after ${startup_s}s"
fi

for round in $(seq 1 "$ROUNDS"); do
  order=("${servers[@]}")
  if (( round % 2 == 0 )); then
    order=(); for (( i=${#servers[@]}-1; i>=0; i-- )); do order+=("${servers[i]}"); done
  fi
  for server in "${order[@]}"; do
    echo "--- round $round/$ROUNDS: $server"
    if [ -n "$vllm_pid" ] && [ "$server" != vllm-serve ]; then
      # Stopped while the others run: idle, its processes still take CPU from them.
      kill -STOP -- "-$vllm_pid"
      before=$(vllm_cpu); measure "$server" "$round"; after=$(vllm_cpu)
      kill -CONT -- "-$vllm_pid"
      idle_cpu=$("$PY" -c "print(round($idle_cpu + $after - $before, 2))")
    else
      measure "$server" "$round"
    fi
  done
done

if [ -n "$vllm_pid" ]; then
  echo "vLLM-CPU used ${idle_cpu} CPU s while the other servers were measured"
  "$PY" - "$ROUND_DIR/peer-vllm-serve.json" "$startup_s" "$idle_cpu" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from peers import vllm_settings
out, startup, idle = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
record = {"startup_s": startup, "idle_cpu_s_while_others_ran": idle,
          "settings": vllm_settings.record(), "serve_flags": "--dtype float32 (defaults otherwise)"}
open(out, "w").write(json.dumps(record, indent=1))
EOF
fi

"$PY" benchmarks/summarize_serving.py "$ROUND_DIR" --out "$RESULTS/$(date +%F)-cpu-$TAG.json"
