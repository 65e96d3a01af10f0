// The arithmetic the tile drivers (driver.cpp) spend their time in: small dense GEMMs and softmax
// row helpers over float32. kernels.cpp is compiled once per instruction set (AVX-512, AVX2,
// baseline; NEON is the aarch64 baseline) and select_kernels() picks one at run time.
#pragma once

#include <cstdint>

namespace na {

struct KernelTable {
  const char* name;
  int vw;  // floats per vector register; callers pad the N of gemm to a multiple of it for speed
  // C[M][N] (+)= A[M][K] . B[K][N], all row-major with leading dimensions lda, ldb, ldc.
  void (*gemm)(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool accumulate);
  float (*row_max)(const float* x, int n);
  // dst[i] = exp(src[i] - shift); returns the sum of dst. dst may equal src.
  float (*exp_sum)(float* dst, const float* src, int n, float shift);
  // dst[i] = exp(src[i] + add[i] - shift) (rpb or nothing added: add may be null); returns the sum.
  float (*exp_add_sum)(float* dst, const float* src, const float* add, int n, float shift);
  // ds[i] = p[i] * (dp[i] - c)
  void (*ds_row)(float* ds, const float* p, const float* dp, float c, int n);
  float (*dot)(const float* a, const float* b, int n);
  void (*axpy)(float* y, float a, const float* x, int n);
  // false when any of x[0..n) is inf or NaN
  bool (*all_finite)(const float* x, int64_t n);
};

const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_base();

// The best table this CPU runs (NATTEN_MLX_SIMD=avx512|avx2|base overrides, for tests and benches).
const KernelTable& select_kernels();

}  // namespace na
