# Dev and CI set-up: a local .venv with the CPU build of torch pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install test test-fast serve bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

serve: $(STAMP)
	$(VENV)/bin/llmserve serve $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check llmserve tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
