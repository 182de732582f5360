#!/usr/bin/env bash
# The headline GPU figures in one command (the jobs are described in benchmarks/gpu_suite.py):
# bf16 training patches/s and MFU (step alone; loader + step), 3-plane soft-vote prediction of a
# 512^3 scan zarr-in/zarr-out (voxels/s, peak device memory), and the MONAI peer on the same
# jobs when torch is installed. Results: benchmarks/results/gpu_suite_<machine>.{json,md}.
#
#   benchmarks/gpu_suite.sh              # a GPU: under 8 minutes on one H100 / H200
#   benchmarks/gpu_suite.sh --cpu        # tiny shapes on a CPU (tests/test_gpu_suite.py)
#   benchmarks/gpu_suite.sh --peers=no --results_dir=/tmp/suite
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_suite.py "$@"
