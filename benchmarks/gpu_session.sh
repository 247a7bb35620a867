#!/usr/bin/env bash
# One prepared GPU session (issue 15): everything a lent GPU machine should run, with its own time
# limits, in one call. On the GPU machine torch, lightning, torchmetrics, einops, scipy and
# tensorboard are installed; the other requirements travel as wheels in .whl/, made on the
# development machine from the repository root (the device tool's `carry: [".whl"]`):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl jsonargparse==4.53.0 typeshed-client==2.15.0 docstring-parser==0.18.0 ema-pytorch==0.8.3 \
#     torch-fidelity==0.4.0
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]       # OUT_DIR default: $OUT, else ./gpu_out
#
# Writes to OUT_DIR: gpu.md (the gpu section of RESULTS.md), bench.log, pytest.log, nvidia-smi.txt.
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 3
fi
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# 1. the benchmark first: it is what only a GPU can give (about 4 minutes at SR-160, batch 32)
timeout 330 python3 benchmarks/run.py --device cuda --output "$out/gpu.md" 2>&1 | tee "$out/bench.log"
# 2. the suite on a machine with a GPU, with whatever time is left (the slow subprocess tests last)
timeout 200 python3 -m pytest -q -x tests -p no:cacheprovider 2>&1 | tail -40 > "$out/pytest.log"
echo "pytest exit: ${PIPESTATUS[0]}" >> "$out/pytest.log"
