// Stand-in for MLX's mlx/backend/cuda/device/utils.cuh in the CI compile check (tests/cuda/test_compile.py):
// the natten-mlx kernels use only CUDA's own half/bfloat16 types from it, and MLX's default header
// defines `inf` through cuda::std::numeric_limits.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/limits>
