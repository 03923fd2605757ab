#!/usr/bin/env bash
# Online serving: llmserve vs `transformers serve --continuous-batching`, same checkpoint, same
# load, in interleaved rounds (llmserve, peer, peer with one torch thread; repeated), so that a
# machine whose speed drifts between minutes cannot favour either side. Writes every round to
# $RESULTS/<date>-cpu-<tag>.json with the medians and the ratio, and prints the summary table.
#
#   [ENDPOINT=/v1/chat/completions] [ROUNDS=3] bash benchmarks/compare_serving.sh [NUM_PROMPTS] [CONCURRENCY]
#
# Checkpoint: a random 2-layer, hidden-128 Llama (bpe tokenizer). Greedy decoding, no
# ignore_eos (transformers serve refuses unknown fields), so both servers produce the same tokens.
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
ROUND_DIR=$(mktemp -d)
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ -f "$CKPT/config.json" ] || "$PY" -c "from llmserve.models.random_checkpoint import build_random_checkpoint as b; b('$CKPT', 'llama', tokenizer='bpe', hidden_size=128, intermediate_size=384)"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap 'cleanup; rm -rf "$ROUND_DIR"' EXIT

wait_up() { for _ in $(seq 1 240); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "server at $1 did not start" >&2; return 1; }

run_bench() {  # PORT MODEL NAME ROUND
  "$PY" benchmarks/serving.py --base-url "http://127.0.0.1:$1" --model "$2" --tokenizer "$CKPT" --endpoint "$ENDPOINT" \
    --num-prompts "$N" --input-len 128 --output-len 128 --max-concurrency "$C" --seed 0 \
    --goodput ttft:1000 tpot:100 --result-json "$ROUND_DIR/round-$4-$3.json" | grep -E "Output token|P90 TTFT"
}

for round in $(seq 1 "$ROUNDS"); do
  echo "--- round $round/$ROUNDS: llmserve"
  "$PY" -m llmserve.cli serve --model "$CKPT" --port 8601 --trace-db off --log-level warning &
  pids+=($!)
  wait_up http://127.0.0.1:8601/health
  run_bench 8601 "$(basename "$CKPT")" llmserve "$round"
  cleanup; pids=()

  # The peer as shipped, and again with one torch thread (llmserve's engine also runs one torch
  # thread on 2 cores), so neither side wins by thread settings alone.
  for threads in default 1; do
    if [ "$threads" = 1 ]; then export OMP_NUM_THREADS=1; name=transformers-serve-1thread; else name=transformers-serve; fi
    echo "--- round $round/$ROUNDS: $name"
    .venv/bin/transformers serve "$CKPT" --continuous-batching --host 127.0.0.1 --port 8602 >/tmp/transformers-serve.log 2>&1 &
    pids+=($!)
    wait_up http://127.0.0.1:8602/v1/models
    run_bench 8602 "$CKPT" "$name" "$round"
    cleanup; pids=()
    unset OMP_NUM_THREADS
    sleep 2
  done
done

"$PY" benchmarks/summarize_serving.py "$ROUND_DIR" --out "$RESULTS/$(date +%F)-cpu-$TAG.json"
