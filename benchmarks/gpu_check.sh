#!/usr/bin/env bash
# One unattended GPU check, about 8 minutes on one H200 (budget GPU_CHECK_BUDGET_S, default
# 510 s), in order of what matters most:
#   checkpoint      a random Qwen3-0.6B-shaped bf16 checkpoint (built once, shared by the steps)
#   pytest_kernels  kernel tests compiled on CUDA (bf16 included)
#   throughput      end-to-end offline throughput, 256 prompts x 100-1024 in / 100-1024 out
#   gpu_busy        device kernel time over wall time for a window of decode steps of that run
#   single_stream   batch-1 ms/token, llmserve beside transformers' `generate`
#   kernels_bench   decode GB/s vs copy bandwidth, host us per call, prefill TFLOP/s, tuning
#   serving         llmserve's server vs `transformers serve --continuous-batching`
# Every step has its own timeout (never past the budget) and the script carries on past
# failures. After each step, $OUT/gpu_check.json (every result so far, merged) and
# $OUT/gpu_check_logs.txt (the tail of each step's log) are rewritten, so a run cut short keeps
# what finished. Only those two files go to $OUT: the device tool brings back at most 8.
#
# The serving step needs the FastAPI stack, which the GPU machine lacks: first, on this machine,
#   bash benchmarks/fetch_gpu_wheels.sh            # ~15 MiB into benchmarks/wheels/py312 (ignored)
# then call the device tool with carry: ["benchmarks/wheels"], e.g.
#   run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/wheels"], timeout_s=600)
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # from the repository root
#   GPU_CHECK_SKIP=throughput,kernels_bench  PYTHON=.venv/bin/python  GPU_CHECK_BUDGET_S=510
#
# Uses the machine's python3 (no virtualenv) with PYTHONPATH=. ; needs no network.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-510}"   # whole script, seconds
CKPT="${GPU_CHECK_CKPT:-/tmp/llmserve-bench-qwen3-0.6b-bfloat16}"
START=$(date +%s)
WORK=$(mktemp -d)
STEPS="$WORK/steps.jsonl"
: >"$STEPS"
export PYTHONPATH=. PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_UPDATE_CHECK=1
unset TRITON_INTERPRET   # the kernels must run compiled here, not in the CPU interpreter

remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_step NAME CAP_S CMD...: run with timeout min(CAP_S, time left), log to $WORK/NAME.log,
# record the outcome, then rewrite the merged JSON. STEP_LIMIT holds the timeout given.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left t0 rc log="$WORK/$name.log"
  STEP_LIMIT=0
  if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
    echo "{\"step\": \"$name\", \"skipped\": \"GPU_CHECK_SKIP\"}" >>"$STEPS"
    merge
    return
  fi
  left=$(remaining)
  STEP_LIMIT=$((cap < left ? cap : left))
  if ((STEP_LIMIT < 20)); then
    echo "{\"step\": \"$name\", \"skipped\": \"out of time budget\"}" >>"$STEPS"
    echo "== $name: skipped (out of time budget)"
    merge
    return
  fi
  echo "== $name (timeout ${STEP_LIMIT}s): $*"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$STEP_LIMIT" "$@" >"$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"timeout_s\": $STEP_LIMIT, \"timed_out\": $([[ $rc == 124 || $rc == 137 ]] && echo true || echo false)}" >>"$STEPS"
  merge
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pci.bus_id \
  --format=csv,noheader >"$WORK/smi.csv" 2>&1 || true
nvidia-smi >"$WORK/smi.txt" 2>&1 || true

# The merge: every step's JSON and the junit summary into $OUT/gpu_check.json, the tail of every
# step's log into $OUT/gpu_check_logs.txt.
cat >"$WORK/merge.py" <<'EOF'
import datetime, glob, json, os, platform, sys, xml.etree.ElementTree as ET
out, work = sys.argv[1], sys.argv[2]

def read(path, parse=json.load):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return parse(f)
    except Exception as exc:  # a step cut short can leave partial output
        return {"unreadable": f"{os.path.basename(path)}: {exc.__class__.__name__}: {exc}"[:300]}

def junit(f):
    root = ET.parse(f).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or "")[:300]})
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return {**totals, "failed": failed[:50]}

def text(path):
    try:
        return open(path).read()
    except OSError:
        return ""

smi = text(os.path.join(work, "smi.csv")).strip()
keys = ["name", "driver", "memory_total", "max_sm_clock", "max_mem_clock", "power_limit", "pci_bus"]
report = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host": platform.node(), "python": platform.python_version(),
    "gpu": [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in smi.splitlines()],
    "nvidia_smi": text(os.path.join(work, "smi.txt"))[-4000:],
    "steps": [json.loads(line) for line in open(os.path.join(work, "steps.jsonl")) if line.strip()],
    "tests": read(os.path.join(work, "junit.xml"), junit),
}
for name in ("throughput", "gpu_busy", "single_stream", "kernels", "kernels_moe", "serving"):
    report[name] = read(os.path.join(work, f"{name}.json"))
versions = {}
for module in ("torch", "triton", "transformers"):
    try:
        versions[module] = __import__(module).__version__
    except Exception as exc:
        versions[module] = f"error: {exc}"
report["versions"] = versions
tmp = os.path.join(out, ".gpu_check.json.tmp")
with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
os.replace(tmp, os.path.join(out, "gpu_check.json"))
with open(os.path.join(out, "gpu_check_logs.txt"), "w") as f:
    for step in report["steps"]:
        lines = text(os.path.join(work, f"{step['step']}.log")).splitlines()
        f.write(f"===== {step['step']}: {json.dumps(step)}\n")
        f.write("\n".join(lines[-300:]) + "\n")
if "--summary" in sys.argv:  # the headline figures, for the end of the console output
    def get(*path):
        node = report
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node
    t = report["tests"] or {}
    print(f"tests: {t.get('passed')} passed, {t.get('failures')} failed, {t.get('errors')} errors")
    print("steps:", ", ".join(f"{s['step']}={s.get('rc', s.get('skipped'))}" for s in report["steps"]))
    print("throughput llmserve out tok/s:", get("throughput", "runs", "llmserve", "output_tok_s"))
    print("gpu busy fraction:", get("gpu_busy", "busy_fraction"),
          "(at plain step time:", get("gpu_busy", "busy_fraction_at_plain_step_time"), ")")
    for engine in ("llmserve", "transformers"):
        print(f"single stream {engine} ms/token:", get("single_stream", "runs", engine, "ms_per_token"))
    for key, value in (report.get("serving") or {}).items():
        if key.startswith("output_tok_s_ratio"):
            print(f"serving {key}: {value}")
    for row in get("kernels", "host_overhead") or []:
        print(f"host us/call b{row.get('batch')} ctx{row.get('context')}: "
              f"wrapper {row.get('wrapper_host_us')}, layer {row.get('backend_layer_host_us')} "
              f"(JIT only {row.get('backend_layer_host_us_jit_only')}), kernel ms {row.get('kernel_ms_graph')}")
EOF
merge() { "$PY" "$WORK/merge.py" "$OUT" "$WORK" || echo "gpu_check: merge failed"; }

# 0. The checkpoint every later step uses (throughput.py's preset, random weights, bf16).
cat >"$WORK/checkpoint.py" <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
from throughput import PRESETS
from llmserve.models.random_checkpoint import build_random_checkpoint
preset = dict(PRESETS["qwen3-0.6b"])
build_random_checkpoint(sys.argv[1], preset.pop("architecture"), seed=0, dtype="bfloat16", **preset)
EOF
if [[ ! -f "$CKPT/config.json" ]]; then
  run_step checkpoint 90 "$PY" "$WORK/checkpoint.py" "$CKPT"
fi

# 1. Kernel tests, compiled on CUDA; xdist spreads the Triton compiles over the CPU cores.
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
run_step pytest_kernels 120 \
  "$PY" -m pytest tests/kernels -q -rfE -p no:cacheprovider "${XDIST[@]}" --junitxml="$WORK/junit.xml"

# 2. End-to-end offline throughput (llmserve alone: transformers' generate_batch did not finish
# this workload in 150 s on 2026-11-29; the single-stream and serving steps compare with it).
run_step throughput 100 \
  "$PY" benchmarks/throughput.py --model "$CKPT" --num-prompts 256 \
  --input-len-range 100 1024 --output-len-range 100 1024 --dtype bfloat16 \
  --skip hf-static --skip hf-cb --json "$WORK/throughput.json"

# 3. GPU-busy fraction over a window of decode steps of the same workload.
run_step gpu_busy 90 \
  "$PY" benchmarks/gpu_busy.py --model "$CKPT" --dtype bfloat16 --json "$WORK/gpu_busy.json"

# 4. Single stream: 128-token prompt, 512 new tokens (transformers: 64, at ~77 ms each).
run_step single_stream 90 \
  "$PY" benchmarks/single_stream.py --model "$CKPT" --dtype bfloat16 --prompt-len 128 \
  --new-tokens 512 --hf-new-tokens 64 --json "$WORK/single_stream.json"

# 5. Kernel benchmarks (decode GB/s vs copy bandwidth, host overhead, prefill, tuning sweep).
run_step kernels_bench 110 \
  "$PY" benchmarks/kernels.py --json "$WORK/kernels.json" --tune

# 5b. Fused MoE against a per-expert loop at Qwen3-30B-A3B's and Mixtral's shapes.
run_step kernels_moe 60 "$PY" benchmarks/kernels_moe.py --quick --json "$WORK/kernels_moe.json"

# 6. Online serving against transformers serve; it paces itself to the step's time.
left=$(remaining)
cap=$((left < 220 ? left : 220))
run_step serving "$cap" env SERVING_BUDGET_S=$((cap - 10)) SERVING_DIR="$WORK/serving" \
  SERVING_JSON="$WORK/serving.json" CKPT="$CKPT" bash benchmarks/gpu_serving.sh

"$PY" "$WORK/merge.py" "$OUT" "$WORK" --summary
rm -rf "$WORK"
echo "gpu_check finished in $(($(date +%s) - START))s; wrote $OUT/gpu_check.json"
