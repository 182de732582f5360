#!/usr/bin/env bash
# The headline GPU figures in one command (the jobs are described in benchmarks/gpu_suite.py):
# bf16 training patches/s and MFU (loader + step with the trainer's default device sampler and
# with the host sampler; the same step alone), a profiler trace of training and prediction steps,
# 3-plane soft-vote prediction of a 512^3 scan zarr-in/zarr-out (voxels/s, peak device memory),
# and the MONAI peer when torch and monai are installed. MFU against the datasheet and the
# measured peak, side by side. Results: benchmarks/results/gpu_suite_<machine>.{json,md} and
# gpu_suite_<machine>_trace/.
#
#   benchmarks/gpu_suite.sh              # a GPU: the jobs' time limits add up to 570 s
#   benchmarks/gpu_suite.sh --cpu        # tiny shapes on a CPU; exits 1 unless every row has a figure
#   benchmarks/gpu_suite.sh --peers=no --results_dir=/tmp/suite
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_suite.py "$@"
