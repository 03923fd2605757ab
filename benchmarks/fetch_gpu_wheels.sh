#!/usr/bin/env bash
# Download the wheels that the serving step of benchmarks/gpu_check.sh installs on the GPU
# machine, which has no package registry: CPython 3.12, manylinux x86_64, the pinned list in
# benchmarks/gpu_wheels.txt (no dependencies fetched: the list is the closure of what that
# machine lacks). Run it here, before the GPU call:
#
#   bash benchmarks/fetch_gpu_wheels.sh            # -> benchmarks/wheels/py312/*.whl
#   PYVER=3.11 bash benchmarks/fetch_gpu_wheels.sh # -> benchmarks/wheels/py311 (to try it here)
#
# benchmarks/wheels/ ignores itself (a .gitignore of '*' written below), so the wheels are never
# committed and travel to the GPU machine only when named: the device call passes
# carry: ["benchmarks/wheels"]. About 15 MiB (grpcio is half), inside the 64 MiB one call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${PYVER:-3.12}
DEST="benchmarks/wheels/py${PYVER/./}"
mkdir -p benchmarks/wheels
printf '# Downloaded by benchmarks/fetch_gpu_wheels.sh; never committed.\n*\n' >benchmarks/wheels/.gitignore
TMP=$(mktemp -d "benchmarks/wheels/.download.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$PYVER" "${platforms[@]}" -r benchmarks/gpu_wheels.txt -d "$TMP"
# Replace the folder whole: two versions of one package would stop the install there.
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
count=$(find "$DEST" -name '*.whl' | wc -l)
echo "fetch_gpu_wheels: $count wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
