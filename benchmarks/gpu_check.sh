#!/usr/bin/env bash
# The GPU path proven in one run on a machine with a CUDA GPU (<= 8 minutes on one GPU): the tests marked `gpu`, the
# input pipeline against compute on the GPU, resnet50 @224 training images/s with AMP + channels_last (and whether
# torch.compile helps); one table at the end (also $OUT/gpu_check.md). Without CUDA it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [--quick]        (PYTHON=... picks the interpreter; default: python of the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
timeout 480 "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
