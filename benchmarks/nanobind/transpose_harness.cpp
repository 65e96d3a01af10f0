// Transposes of heads-last key rows in isolation (the nineteenth pass's measurement, RESULTS.md): the
// extension's own transpose8 (from kernels.cpp, compiled as the wheel compiles it) on C2's keys, 4096
// tokens x 4 heads x 32 features, into per-head [32][ld] slices, in ns per float. Not built by the
// package; from the repository root:
//
//   K=packages/natten-mlx-nanobind/csrc; F="-std=c++20 -O3 -Wno-psabi -I$K"
//   g++ $F -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx2 -mfma -mf16c -DNA_VARIANT=avx512 \
//       -DNA_VARIANT_avx512=1 -c $K/kernels.cpp -o /tmp/k512.o
//   g++ $F -mavx2 -mfma -mf16c -DNA_VARIANT=avx2 -DNA_VARIANT_avx2=1 -c $K/kernels.cpp -o /tmp/k2.o
//   g++ $F -DNA_VARIANT=base -DNA_VARIANT_base=1 -c $K/kernels.cpp -o /tmp/kb.o
//   g++ $F -mavx2 -mfma benchmarks/nanobind/transpose_harness.cpp /tmp/k512.o /tmp/k2.o /tmp/kb.o -o /tmp/th
//   /tmp/th MODE [COLD]
//
// MODE 0: transpose8 (pointer array, as transpose_rows_grouped calls it) into whole-slice rows, one
//         head's 8 tokens after another along a slice;
//      1: the same with the finiteness check (transpose8_finite);
//      2: a strided 8x8 transpose in AVX intrinsics here (no pointer array);
//      3: mode 0 with all heads of 8 tokens in turn (whole heads-last token rows per pass); 4: mode 2 so;
//      5: transpose8 into a ring of 8 rows of 64 tokens (the destination stays in L1/L2).
// COLD 1: a 64 MiB sweep between iterations, so the source and destination come from memory.
#include "kernels.h"
#include <immintrin.h>
#include <chrono>
#include <vector>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <cstdlib>
namespace na { bool perm_al = false; }
using namespace na;
__attribute__((noinline)) void t8s(const float* src, int64_t rs, int64_t w, float* dst, int64_t ld) {
  for (int64_t c0 = 0; c0 + 8 <= w; c0 += 8) {
    const float* s = src + c0;
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + rs), r2 = _mm256_loadu_ps(s + 2*rs), r3 = _mm256_loadu_ps(s + 3*rs);
    __m256 r4 = _mm256_loadu_ps(s + 4*rs), r5 = _mm256_loadu_ps(s + 5*rs), r6 = _mm256_loadu_ps(s + 6*rs), r7 = _mm256_loadu_ps(s + 7*rs);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5), t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE), u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE), u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    float* d = dst + c0 * ld;
    _mm256_storeu_ps(d + 0*ld, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + 1*ld, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2*ld, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3*ld, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4*ld, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5*ld, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6*ld, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7*ld, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
}
int main(int argc, char** argv) {
  const KernelTable& kt = *kernels_avx512();
  const int64_t N = 4096, H = 4, D = 32, ld = 4096 + 16 + 96;
  int mode = atoi(argv[1]);
  float* x = (float*)aligned_alloc(64, N * H * D * 4 + 64) + 4;
  for (int64_t i = 0; i < N * H * D; ++i) x[i] = i * 1e-3f;
  float* dst = (float*)aligned_alloc(64, H * D * ld * 4);
  memset(dst, 0, H * D * ld * 4);
  std::vector<double> ts;
  int cold = argc > 2 ? atoi(argv[2]) : 0;
  std::vector<float> big(cold ? 16 << 20 : 1);
  for (int it = 0; it < 200; ++it) {
    if (cold) for (size_t i = 0; i < big.size(); i += 16) big[i] += 1.f;
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t o1 = 0; o1 < (mode >= 3 ? N / 8 : H); ++o1)
      for (int64_t o2 = 0; o2 < (mode >= 3 ? H : N / 8); ++o2) {
        const int64_t h = mode >= 3 ? o2 : o1, j0 = 8 * (mode >= 3 ? o1 : o2);
        if (mode == 0 || mode == 3) {
          const float* s[8];
          for (int j = 0; j < 8; ++j) s[j] = x + ((j0 + j) * H + h) * D;
          kt.transpose8(s, D, dst + h * D * ld + j0, ld);
        } else if (mode == 1) {
          const float* s[8];
          for (int j = 0; j < 8; ++j) s[j] = x + ((j0 + j) * H + h) * D;
          kt.transpose8_finite(s, D, dst + h * D * ld + j0, ld);
        } else if (mode == 5) {  // ring destination: 8 rows of 64 tokens
          const float* s[8];
          for (int j = 0; j < 8; ++j) s[j] = x + ((j0 + j) * H + h) * D;
          kt.transpose8(s, D, dst + h * D * ld + (j0 % 512), ld);
        } else if (mode == 2 || mode == 4) {
          t8s(x + (j0 * H + h) * D, H * D, D, dst + h * D * ld + j0, ld);
        }
      }
    auto t1 = std::chrono::steady_clock::now();
    ts.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  printf("mode %d min %.1f us med %.1f us  %.2f ns/float\n", mode, ts[0] * 1e6, ts[ts.size() / 2] * 1e6, ts[0]*1e9/(N*H*D));
}
