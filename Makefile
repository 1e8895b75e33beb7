# Every target installs what it needs first, so `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.capfilt-installed

.PHONY: install browser demo test lint bench bench-gpu ablation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev,dali]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/capfilt demo

# The report test opens the page in a real headless browser: Debian's chromium.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

test: install browser
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check capfilt pipelines tests
	$(BIN)/ruff format --check capfilt pipelines tests

bench: install
	$(BIN)/capfilt bench

# The GPU path at BLIP-base size (random weights), on the demo world; the table goes to bench-gpu.md.
bench-gpu: install
	$(BIN)/capfilt bench -c blip-base --device cuda --table bench-gpu.md

# The three seeds side by side, one process each: together 1.3x the training rate of one process with
# both cores on this project's 2-core machine (docs/RESULTS.md, the ablation's wall time).
ablation: install
	$(BIN)/capfilt ablation --parallel 3

clean:
	rm -rf $(VENV) build *.egg-info
