#!/usr/bin/env bash
# The whole core, parity and tier test suites on the lent GPU, in one device call (issue 13).
# From the repository root, through the device tool (carry .whl and .device, see ../shared/device/README.md):
#
#   bash benchmarks/gpu/run_suite.sh [extra pytest args]
#
# MLX runs float32 matmuls as TF32 on NVIDIA GPUs by default; the tests compare with float64 at
# float32 tolerances, so TF32 is off. natten-mlx-cuda is made discoverable through its entry point
# by a dist-info written next to the carried wheels (the machine cannot pip-install the repo).
# Set NATTEN_BACKEND to force a backend; by default the automatic choice serves each call.
# The CPU-only checks of tests/cuda (nvcc compile check, emulator runs) skip themselves on a GPU machine.
# Prints pytest's counts last; the JUnit XML goes to $OUT/suite.xml when $OUT is set. Extra arguments go to
# pytest (e.g. `-n 4`: pytest-xdist is on the GPU machine; four processes share the one GPU).
set -u
source .device/setup.sh || exit 1
info=/tmp/site/natten_mlx_cuda-0.4.0.dist-info
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: natten-mlx-cuda\nVersion: 0.4.0\n' > "$info/METADATA"
printf '[natten_mlx.backends]\ncuda = natten_mlx_cuda\n' > "$info/entry_points.txt"
export MLX_ENABLE_TF32=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import natten_mlx; from natten_mlx.dispatch import list_backends; print('backends:', [b.name for b in list_backends()])"
xml=()
[ -n "${OUT:-}" ] && xml=(--junitxml "$OUT/suite.xml")
# the whole log goes to $OUT/suite.log too, so a run cut by the call's time limit still shows its progress
python3 -m pytest -q -p no:cacheprovider -rfE "${xml[@]}" tests/core tests/parity tests/cuda "$@" 2>&1 | tee "${OUT:-/tmp}/suite.log" | tail -n 60
