#!/usr/bin/env bash
# The paper-scale GPU benchmark on a machine with no network and its own torch (2.11 or
# newer, CUDA): pure-Python dependencies travel as wheels.
#
#   On a machine with network, from the repo root (Python 3.12 target shown):
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform any -d .whl diffusers==0.42.1 importlib_metadata av
#     pip wheel --no-deps -w .whl .
#   Copy the repo (with .whl) to the GPU machine, then:
#     bash bench/gpu_offline.sh OUT_DIR [BUDGET_S]
#
# Writes OUT_DIR/{env.txt,tests.txt,bench.log,gpu_cuda.json,profile.txt}. The CUDA tests run
# from a copy of tests/ so that the installed package, not the source folders, is imported.
set -uo pipefail
out=${1:?usage: gpu_offline.sh OUT_DIR [BUDGET_S]}
budget=${2:-480}
mkdir -p "$out"
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 2
export PYTHONPATH=$site PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c 'import torch, diffusers, transformers; print(torch.__version__, torch.version.cuda, diffusers.__version__, transformers.__version__)'; } >"$out/env.txt" 2>&1
tests=$(mktemp -d)
cp -r tests "$tests/"
(cd "$tests" && timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fast_step.py) >"$out/tests.txt" 2>&1
echo "tests: exit $?"
tail -3 "$out/tests.txt"
timeout $((budget + 60)) python3 bench/gpu_bench.py --budget-s "$budget" --json "$out/gpu_cuda.json" \
    --profile-out "$out/profile.txt" >"$out/bench.log" 2>&1
status=$?
grep -e "^\[" "$out/bench.log" | grep -v "\.\.\.$" | tail -20
sed -n '/ | torch /,$p' "$out/bench.log"
exit $status
