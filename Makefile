# vpp-edge: `make demo` runs the embedded default, `make test` runs the tests.
# The Makefile owns its virtual environment (.venv) and installs pinned dependencies.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install demo predict export export-openvino build-engines test test-fast lint clean

# make export [PRESET=calvin] [CKPT=checkpoints/run] [ARTIFACT=artifacts/name]
PRESET   ?=
CKPT     ?=
ARTIFACT ?= artifacts/$(or $(PRESET),$(if $(CKPT),$(notdir $(CKPT)),tiny))

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/lock.txt requirements/apt.txt
	@$(MAKE) --no-print-directory system-deps || echo "warning: system packages missing (see requirements/apt.txt): the SSH deployment and MetaWorld tests will skip"
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vpp-edge needs Python >= 3.11, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

install: $(STAMP)  ## create .venv and install the pinned dependencies

# make demo [ARTIFACT=artifacts/name]: an ARTIFACT given is what runs (never replaced by the MetaWorld policy)
demo: $(STAMP)  ## the main job, closed loop: tiny model (or the trained MetaWorld policy) + replay cameras + sim bridge (10 s)
	$(BIN)/vpp demo $(if $(filter command line environment,$(origin ARTIFACT)),--artifact $(ARTIFACT))

predict: $(STAMP)  ## one predict step of the tiny model on a sample episode, with per-stage timings
	$(BIN)/vpp predict

export: $(STAMP)  ## ONNX graphs + parity gates + FP16/INT8 into $(ARTIFACT) (CKPT=, PRESET=)
	$(BIN)/vpp export $(if $(PRESET),--preset $(PRESET)) $(if $(CKPT),--checkpoint $(CKPT)) --out $(ARTIFACT)

export-openvino: $(STAMP)  ## OpenVINO INT8 (NNCF, gated like the others) added to $(ARTIFACT) as int8_ov
	$(BIN)/python -m vpp_edge.export.openvino_int8 $(ARTIFACT) --threads 2

build-engines: $(STAMP)  ## TensorRT engines for $(ARTIFACT), built on this machine
	$(BIN)/vpp build-engines --artifact $(ARTIFACT)

# make train-policy [TRAIN_CONFIG=policy_tiny] [RUN=runs/policy-tiny]; multi-GPU: accelerate launch -m vpp_edge.cli train ...
TRAIN_CONFIG ?=
.PHONY: train-policy train-tvp
train-policy: $(STAMP)  ## stage 2: Video Former + action head on frozen TVP features (tiny on the samples: minutes)
	$(BIN)/vpp train policy --config $(or $(TRAIN_CONFIG),policy_tiny) --out $(or $(RUN),runs/policy-tiny)

train-tvp: $(STAMP)  ## stage 1: fine-tune the TVP video model; prediction GIFs in <run>/samples
	$(BIN)/vpp train tvp --config $(or $(TRAIN_CONFIG),tvp_tiny) --out $(or $(RUN),runs/tvp-tiny)

# make calibrate [GRID=tiny] [CKPT=checkpoints/run]: resumable; report + recommended.yaml in artifacts/calibrate/$(GRID)
GRID ?= tiny
.PHONY: calibrate
calibrate: $(STAMP)  ## latency/accuracy sweep + Pareto report + recommended runtime config (GRID=, CKPT=)
	$(BIN)/vpp calibrate sweep --grid $(GRID) --out artifacts/calibrate/$(notdir $(basename $(GRID))) $(if $(CKPT),--checkpoint $(CKPT))

# make deploy-jetson JETSON=user@host [ARTIFACT=artifacts/name] [ROBOT=sim] [DEPLOY_ARGS="--dry-run ..."]
JETSON ?=
ROBOT  ?=
.PHONY: deploy-jetson system-deps
deploy-jetson: $(STAMP)  ## bundle $(ARTIFACT), rsync it to JETSON=user@host, build engines, self-test, restart units
	@test -n "$(JETSON)" || { echo "usage: make deploy-jetson JETSON=user@host [ARTIFACT=...] [ROBOT=sim] [DEPLOY_ARGS=--dry-run]"; exit 2; }
	$(BIN)/vpp deploy --target $(JETSON) $(if $(RUNTIME_CONFIG),--runtime-config $(RUNTIME_CONFIG),--artifact $(ARTIFACT)) $(if $(ROBOT),--robot $(ROBOT)) $(DEPLOY_ARGS)

system-deps:  ## apt-get install what requirements/apt.txt lists and is missing (needs root or sudo)
	@missing=$$(for p in $$(grep -v '^#' requirements/apt.txt); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "system packages present: $$(grep -v '^#' requirements/apt.txt | xargs)"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; \
	else echo "system-deps: need root or sudo to install: $$missing" >&2; exit 1; fi; \
	echo "installing: $$missing"; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing

# make metaworld-policy: the recipe behind the shipped MetaWorld policy (models/metaworld-tiny):
# oracle demos of the demo's tasks (vpp record/eval's default) -> stage 1, the TVP fine-tuned on
# the demo videos -> stage-2 training of metaworld_tiny on its frozen features -> its FP16 copy
# (what ships) -> export (FP32 + INT8) -> evaluation of both. TVP= (empty) trains stage 2 on a
# random TVP instead (the comparison in docs/benchmarks.md).
MW_EPISODES ?= 50
MW_EVAL     ?= 20
TVP         ?= runs/tvp-metaworld/last
.PHONY: metaworld-policy
metaworld-policy: $(STAMP)  ## record MetaWorld demos, train metaworld_tiny (stage 1 + 2), ship its FP16 copy, export + evaluate it (FP32, INT8)
	@test -f data/metaworld/demos.json || $(BIN)/vpp record metaworld --episodes $(MW_EPISODES) --out data/metaworld
	@test -z "$(TVP)" || test -e $(TVP) || $(BIN)/vpp train tvp --config tvp_metaworld --out $(dir $(TVP))
	@test -e runs/policy-metaworld/last || $(BIN)/vpp train policy --config policy_metaworld $(if $(TVP),--set init.tvp=$(TVP)) --out runs/policy-metaworld
	$(BIN)/vpp compact runs/policy-metaworld/last --out models/metaworld-tiny
	$(BIN)/vpp export --checkpoint models/metaworld-tiny --out artifacts/metaworld_tiny --precisions fp32,int8 --data data/metaworld
	$(BIN)/vpp eval metaworld --artifact artifacts/metaworld_tiny --episodes $(MW_EVAL) --precision fp32 --out results/metaworld/fp32
	$(BIN)/vpp eval metaworld --artifact artifacts/metaworld_tiny --episodes $(MW_EVAL) --precision int8 --out results/metaworld/int8

# franky-sim pins MuJoCo 4 and MetaWorld MuJoCo 3.3: the simulator gets its own venv.
FRANKY_SIM_STAMP := .venv-franky-sim/.installed-stamp
$(FRANKY_SIM_STAMP): requirements/franky-sim.txt
	$(PYTHON) -m venv .venv-franky-sim
	.venv-franky-sim/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/franky-sim.txt
	@touch $@

.PHONY: franky-sim
franky-sim: $(STAMP) $(FRANKY_SIM_STAMP)  ## franky-sim (the Franka simulator the Panda bridge is tested against) in .venv-franky-sim

.PHONY: bench
bench: $(STAMP)  ## benchmarks: stages per engine vs eager PyTorch, paper-scale FLOPs, runtime loop (bench/results/*.json)
	@test -f artifacts/tiny/manifest.json || $(BIN)/vpp export --preset tiny --out artifacts/tiny
	$(BIN)/python bench/stages_bench.py --artifact artifacts/tiny --paper
	$(BIN)/python bench/runtime_bench.py --artifact artifacts/tiny
	$(BIN)/python bench/bridge_bench.py

.PHONY: bench-safety
bench-safety: $(STAMP)  ## safety chain: fuzz every endpoint, hold/stop latency per runtime fault, memory soak
	$(BIN)/python bench/safety_bench.py

.PHONY: bench-paper-export
bench-paper-export: $(STAMP)  ## paper-scale export (calvin, random weights; 4-12 min quiet): per-phase time and memory, whole process tree peak <= 12 GB, gates
	$(BIN)/python bench/paper_export.py $(if $(PRECISIONS),--precisions $(PRECISIONS))

.PHONY: bench-gpu
bench-gpu: $(STAMP)  ## paper-scale step on a CUDA GPU: eager FP32/BF16/FP16 vs CUDA graph vs compiled, profile, training (offline GPU box: bench/gpu_offline.sh)
	$(BIN)/python bench/gpu_bench.py

test: $(STAMP)  ## run the test suite
	@$(MAKE) --no-print-directory franky-sim || echo "warning: franky-sim did not install: the Franka simulator tests will skip"
	$(BIN)/python -m pytest
	@$(MAKE) --no-print-directory test-robot

# The robot side (protocol, chunking, safety, bridge, runtime threads, TensorRT wrapper, deploy agent)
# under Python 3.10, JetPack 6.2's, without torch: a venv with requirements/robot-jp6.txt's
# versions (this machine's wheels of the same pins; numpy 1.26 and the lock's fallback
# opencv-python-headless, which gives these tests their cv2: on the robot JetPack's own cv2
# replaces it, docs/deploy.md). Skipped, saying so, without a CPython 3.10.
# The runtime-loop tests use an FP32 tiny artifact exported here by the workstation's Python.
ROBOT_VENV     := .venv-robot310
ROBOT_ARTIFACT := build/robot-test-artifact
ROBOT_TESTS    := tests/test_protocol.py tests/test_protocol_fuzz.py tests/test_chunking_safety.py tests/test_bridge.py \
                  tests/test_runtime_safety.py tests/test_runtime_loop.py tests/test_realtime.py \
                  tests/test_tensorrt_engine.py tests/test_deploy_targets.py tests/test_camera_decoders.py \
                  tests/test_registries.py tests/test_runtime_config.py
.PHONY: test-robot
$(ROBOT_ARTIFACT)/manifest.json: $(STAMP) $(wildcard export/*.py training/models/*.py vpp_edge/presets/tiny.yaml)
	$(BIN)/vpp export --preset tiny --precisions fp32 --parity-samples 1 --out $(ROBOT_ARTIFACT) --quiet

test-robot: $(STAMP) $(ROBOT_ARTIFACT)/manifest.json  ## the robot-side tests under Python 3.10 without torch (skipped without python3.10)
	@py=$$($(BIN)/python -m vpp_edge.deploy.wheels python 3.10 2>/dev/null) || { \
	  echo "test-robot: skipped: no CPython 3.10 here (JetPack 6.2's Python; e.g. pyenv install 3.10)"; exit 0; }; \
	if [ ! -f $(ROBOT_VENV)/.stamp ] || [ requirements/robot-jp6.txt -nt $(ROBOT_VENV)/.stamp ]; then \
	  rm -rf $(ROBOT_VENV) && $$py -m venv $(ROBOT_VENV) && \
	  $(ROBOT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/robot-jp6.txt \
	    $$(grep -E '^(pytest|pytest-timeout|hypothesis)==' requirements/lock.txt) && \
	  $(ROBOT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --ignore-requires-python -e . && \
	  touch $(ROBOT_VENV)/.stamp; fi
	$(ROBOT_VENV)/bin/python -c 'import importlib.util, sys; sys.exit("torch in the robot venv" if importlib.util.find_spec("torch") else 0)'
	VPP_TEST_ARTIFACT=$(ROBOT_ARTIFACT) $(ROBOT_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not network" $(ROBOT_TESTS)

test-fast: $(STAMP)  ## the tests without the slow ones
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)  ## static checks (ruff: undefined names, unused imports, syntax)
	$(BIN)/ruff check --select F,E9 --line-length 120 vpp_edge training export calibrate runtime firmware_bridge evaluation deploy tests bench

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache build *.egg-info
