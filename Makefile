# medtune: the two commands a new user types are `make all` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MT     := $(BIN)/medtune

# The main job, on the embedded default model and the bundled sample set.
MODEL  ?= builtin:smollm2-135m
# The run's name: medtune-smollm2 for the default, else from the model (builtin:gemma3-270m -> medtune-gemma3-270m).
NAME   ?= $(if $(filter builtin:smollm2-135m,$(MODEL)),medtune-smollm2,medtune-$(lastword $(subst :, ,$(subst /, ,$(MODEL)))))
DATA   ?= data/sample/medical_o1_sample.jsonl
# Sized to finish well inside 15 minutes on a 2-core CPU; raise them on a Mac.
ITERS  ?= 24
BATCH  ?= 2
MAXLEN ?= 512
LAYERS ?= 8

.PHONY: all test lint format bench setup setup-test openblas test-tools clean-outputs help

help:
	@echo "make all   - set up .venv and run prepare → train → fuse → export → eval on $(MODEL) (medtune run)"
	@echo "make test  - set up .venv with test extras and run the test suite"
	@echo "make lint  - ruff check and ruff format --check (make format rewrites)"
	@echo "make bench - benchmarks against the tools a user would otherwise run"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "medtune needs Python >= 3.10 (set PYTHON=python3.x)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e .
	@touch $@

# llama.cpp, built once for both GGUF runtimes: its tools (llama-server, the engine inside current Ollama;
# llama-perplexity; llama-quantize) and the library llama-cpp-python loads, from the llama.cpp tree of the pinned
# llama-cpp-python sdist, with portable x86 flags (a -march=native build dies with SIGILL on quantized GGUFs on
# VMs that advertise AMX). Cached under ~/.cache/medtune/llama.cpp: ~7 minutes on 2 cores the first time, seconds after.
$(VENV)/.llama-cpp: $(VENV)/.base scripts/build_llama_cpp.sh
	bash scripts/build_llama_cpp.sh $(BIN)/python
	@touch $@

$(VENV)/.test: $(VENV)/.llama-cpp
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $@

openblas:
	@bash scripts/install_openblas.sh

setup: $(VENV)/.base openblas

setup-test: test-tools $(VENV)/.test openblas

test-tools:
	@bash scripts/install_test_tools.sh

# `make all` is `medtune run` on a config written from these variables (runs/$(NAME).yaml, rewritten only when a
# variable changes): prepare → train → fuse → export → ollama (when a server answers) → eval, into runs/$(NAME)/.
# A second `make all` finds every stage up to date and does no work. On a machine without llama.cpp's build, the
# build starts in the background at low priority while the model trains; export (K-quants) and eval (the GGUF
# column: fidelity in llama-server, answers, KL divergence) wait for it.
# The GGUFs: F16 (the reference) and two quants, which the eval judges by KL divergence and recommends from.
QUANTS      ?= f16,q8_0,q4_k_m
EVAL_TOKENS ?= 64
EVAL_LIMIT  ?= 2
EVAL_PROBES ?= 4
RUN_CONFIG  := runs/$(NAME).yaml

all: setup
	@mkdir -p runs
	@printf '%s\n' "# written by make all; edit the Makefile variables instead (make all ITERS=200)" \
		"name: $(NAME)" "model: $(MODEL)" "runs_dir: runs" \
		"prepare:" "  dataset: $(DATA)" "  max_seq_length: $(MAXLEN)" \
		"train:" "  iters: $(ITERS)" "  batch_size: $(BATCH)" "  num_layers: $(LAYERS)" "  max_seq_length: $(MAXLEN)" \
		"  eval_every: 12" "  save_every: 12" \
		"export:" "  quant: [$(QUANTS)]" \
		"eval:" "  max_tokens: $(EVAL_TOKENS)" "  limit: $(EVAL_LIMIT)" "  probe_limit: $(EVAL_PROBES)" > $(RUN_CONFIG).tmp
	@if cmp -s $(RUN_CONFIG).tmp $(RUN_CONFIG); then rm -f $(RUN_CONFIG).tmp; else mv $(RUN_CONFIG).tmp $(RUN_CONFIG); fi
	@bash scripts/build_llama_cpp.sh --background $(BIN)/python
	$(MT) run $(RUN_CONFIG)

test: setup-test
	$(BIN)/python -m pytest -q

# Ruff, pinned in the test extra: the lint rules and the formatter's style are in pyproject.toml.
lint: $(VENV)/.test
	$(BIN)/ruff check medtune tests scripts
	$(BIN)/ruff format --check medtune tests scripts

format: $(VENV)/.test
	$(BIN)/ruff check --fix medtune tests scripts
	$(BIN)/ruff format medtune tests scripts

# BENCH_TRAIN_ARGS="--runs c,d" compares the trainers at the fast BLAS only (minutes instead of ~40 on 2 cores)
BENCH_TRAIN_ARGS ?=

bench: setup
	mkdir -p bench
	$(BIN)/python scripts/bench_prepare.py --json bench/prepare.json
	$(BIN)/python scripts/bench_train.py --json bench/train.json $(BENCH_TRAIN_ARGS)
	$(BIN)/python scripts/bench_export.py --json > bench/export.json
	$(BIN)/python scripts/bench_report.py --dir bench

clean-outputs:
	rm -rf data/processed adapters/$(NAME) models/$(NAME) Modelfiles/$(NAME).Modelfile runs/$(NAME) runs/$(NAME).yaml
