# vpp-edge: `make demo` runs the embedded default, `make test` runs the tests.
# The Makefile owns its virtual environment (.venv) and installs pinned dependencies.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install demo predict export build-engines test test-fast lint clean

# make export [PRESET=calvin] [CKPT=checkpoints/run] [ARTIFACT=artifacts/name]
PRESET   ?=
CKPT     ?=
ARTIFACT ?= artifacts/$(or $(PRESET),$(if $(CKPT),$(notdir $(CKPT)),tiny))

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/lock.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vpp-edge needs Python >= 3.11, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

install: $(STAMP)  ## create .venv and install the pinned dependencies

demo: $(STAMP)  ## the main job, closed loop: tiny model on ONNX Runtime + replay cameras + sim bridge (10 s)
	$(BIN)/vpp demo --artifact artifacts/tiny

predict: $(STAMP)  ## one predict step of the tiny model on a sample episode, with per-stage timings
	$(BIN)/vpp predict

export: $(STAMP)  ## ONNX graphs + parity gates + FP16/INT8 into $(ARTIFACT) (CKPT=, PRESET=)
	$(BIN)/vpp export $(if $(PRESET),--preset $(PRESET)) $(if $(CKPT),--checkpoint $(CKPT)) --out $(ARTIFACT)

build-engines: $(STAMP)  ## TensorRT engines for $(ARTIFACT), built on this machine
	$(BIN)/vpp build-engines $(ARTIFACT)

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## the tests without the slow ones
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)  ## static checks (ruff: undefined names, unused imports, syntax)
	$(BIN)/ruff check --select F,E9 --line-length 120 vpp_edge training export calibrate runtime firmware_bridge tests bench

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache build *.egg-info
