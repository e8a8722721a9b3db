# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
# The GPU kernels' tests run in Triton's CPU interpreter here (a CUDA torch brings its own).
TRITON := triton==3.6.0

.PHONY: setup data train test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH)" "$(TRITON)"
	@echo "building the fused C++ training step (once, about a minute)"
	@$(BIN)/python -c "from lenet import fused; fused.load() or print('fused kernel unavailable:', fused.why_unavailable(), '- PyTorch autograd will be used')"
	touch $(STAMP)

# Fashion-MNIST: found where it is; on Debian as root, installed from Debian's package;
# elsewhere downloaded from the official mirror with checksums.
data: $(STAMP)
	@scripts/ensure-data.sh $(BIN)

train: data
	$(BIN)/lenet train --preset book

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: data lint
	$(BIN)/python -m pytest

test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -m "not slow"

bench: data
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
