#!/usr/bin/env bash
# Every GPU check in one command, for a CUDA machine without network (see bench/GPU.md):
#   bench/gpu.sh [--smoke] [--parts kernel-tests,kernel-bench,step,generate] [--out DIR]
# Installs the wheels carried in .whl/ (if any) into /tmp/site, installs this checkout without its dependencies,
# then runs bench/gpu_run.py, which writes OUT/gpu-<device>-<date>.json (device, versions, commit, every part's
# exit status, time and results) and one log per part. OUT defaults to $OUT (the device tool's output folder), else
# bench/results. --smoke checks the script on any machine (with its own packages): the parts' tests are collected,
# not run.
set -u -o pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SMOKE=0
for argument in "$@"; do [[ $argument == --smoke ]] && SMOKE=1; done
# The carried wheels are built for the GPU machine's Python (3.12); a smoke run uses this machine's packages.
if [[ $SMOKE == 0 ]] && compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu.sh: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PYTHON" -c "import hscr_fast" 2> /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
        || { echo "gpu.sh: installing this checkout failed" >&2; exit 1; }
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
exec "$PYTHON" bench/gpu_run.py "$@"
