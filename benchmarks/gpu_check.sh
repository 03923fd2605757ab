#!/usr/bin/env bash
# One unattended GPU check, under 8 minutes on one H200: kernel tests compiled on CUDA (bf16
# included), the end-to-end offline throughput run (when benchmarks/throughput.py exists) and
# the kernel benchmarks. Every step has its own timeout and the script carries on past
# failures. Results land under $OUT (default ./gpu_check_out): gpu_check.json (everything,
# merged), kernels.json, throughput.json and one log per step.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # from the repository root
#   GPU_CHECK_SKIP=throughput,kernels_bench  PYTHON=.venv/bin/python  GPU_CHECK_BUDGET_S=465
#
# Uses the machine's python3 (no virtualenv) with PYTHONPATH=. ; needs no network.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"   # whole script, seconds
START=$(date +%s)
WORK=$(mktemp -d)
STEPS="$WORK/steps.jsonl"
: >"$STEPS"
export PYTHONPATH=. PYTHONUNBUFFERED=1
unset TRITON_INTERPRET   # the kernels must run compiled here, not in the CPU interpreter

remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_step NAME CAP_S LOG CMD...: run with timeout min(CAP_S, time left), record the outcome.
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left limit t0 rc
  if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
    echo "{\"step\": \"$name\", \"skipped\": \"GPU_CHECK_SKIP\"}" >>"$STEPS"
    return
  fi
  left=$(remaining)
  limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    echo "{\"step\": \"$name\", \"skipped\": \"out of time budget\"}" >>"$STEPS"
    echo "== $name: skipped (out of time budget)"
    return
  fi
  echo "== $name (timeout ${limit}s): $*"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"timeout_s\": $limit, \"timed_out\": $([[ $rc == 124 || $rc == 137 ]] && echo true || echo false), \"log\": \"$(basename "$log")\"}" >>"$STEPS"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pci.bus_id \
  --format=csv,noheader >"$WORK/smi.csv" 2>&1 || true
nvidia-smi >"$WORK/smi.txt" 2>&1 || true

# 1. Kernel tests, compiled on CUDA; xdist spreads the Triton compiles over the CPU cores.
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
run_step pytest_kernels 170 "$OUT/pytest_kernels.log" \
  "$PY" -m pytest tests/kernels -q -rfE -p no:cacheprovider "${XDIST[@]}" --junitxml="$WORK/junit.xml"

# 2. End-to-end offline throughput on a random Qwen3-0.6B-shaped checkpoint (if present).
if [[ -f benchmarks/throughput.py ]]; then
  run_step throughput 240 "$OUT/throughput.log" \
    "$PY" benchmarks/throughput.py --model-preset qwen3-0.6b --num-prompts 256 \
    --input-len-range 100 1024 --output-len-range 100 1024 --dtype bfloat16 --skip hf-static \
    --json "$OUT/throughput.json"
else
  echo '{"step": "throughput", "skipped": "benchmarks/throughput.py not found"}' >>"$STEPS"
fi

# 3. Kernel benchmarks (decode GB/s vs copy bandwidth, prefill TFLOP/s, SDPA peer, tuning sweep).
run_step kernels_bench 170 "$OUT/kernels.log" \
  "$PY" benchmarks/kernels.py --json "$OUT/kernels.json" --tune

# Merge everything into one JSON document.
"$PY" - "$OUT" "$WORK" <<'EOF'
import datetime, json, os, platform, sys, xml.etree.ElementTree as ET
out, work = sys.argv[1], sys.argv[2]

def read(path, parse=json.load):
    try:
        with open(path) as f:
            return parse(f)
    except Exception as exc:  # a step that failed or timed out leaves no (or partial) output
        return {"missing": f"{os.path.basename(path)}: {exc.__class__.__name__}: {exc}"[:300]}

def junit(path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or "")[:300]})
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return {**totals, "failed": failed[:50]}

smi = open(os.path.join(work, "smi.csv")).read().strip()
keys = ["name", "driver", "memory_total", "max_sm_clock", "max_mem_clock", "power_limit", "pci_bus"]
report = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host": platform.node(), "python": platform.python_version(),
    "gpu": [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in smi.splitlines()],
    "nvidia_smi": open(os.path.join(work, "smi.txt")).read()[-4000:],
    "steps": [json.loads(line) for line in open(os.path.join(work, "steps.jsonl")) if line.strip()],
    "tests": read(os.path.join(work, "junit.xml"), lambda f: junit(f)),
    "throughput": read(os.path.join(out, "throughput.json")),
    "kernels": read(os.path.join(out, "kernels.json")),
}
try:
    import torch, triton, transformers
    report["versions"] = {"torch": torch.__version__, "triton": triton.__version__,
                          "transformers": transformers.__version__}
except Exception as exc:
    report["versions"] = {"error": str(exc)}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=2)
t = report["tests"]
print(f"gpu_check: tests {t.get('passed')} passed, {t.get('failures')} failed, "
      f"{t.get('errors')} errors; wrote {os.path.join(out, 'gpu_check.json')}")
EOF
rm -rf "$WORK"
echo "gpu_check finished in $(($(date +%s) - START))s"
