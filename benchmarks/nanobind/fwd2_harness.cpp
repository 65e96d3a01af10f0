// The extension's own forward kernel in isolation (the twentieth pass, RESULTS.md): kt.exact_fwd2 from
// kernels.o, compiled as the wheel compiles it, over one slice of C2 (64x64 queries, K 7x7, D = Dv = 32) in
// row pairs and blocks of 16 queries as the driver calls it, keys and values already transposed in a ring of
// 11 row slots (hot in L1/L2, no transposes, no memory): the kernel's own rate, in GFLOP/s per core (the
// op's 2 * 49 * 64 FLOPs per query). Argument: 0 the interior blocks (runs, alignr slots), 1 the border
// blocks (lane_perm's slots), 2 all four blocks of a row. Not built by the package; from the repository
// root, on an AVX-512 machine (the three kernels.o as for transpose_harness.cpp):
//
//   K=packages/natten-mlx-nanobind/csrc; F="-std=c++20 -O3 -Wno-psabi -I$K"
//   g++ $F -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx2 -mfma -mf16c -DNA_VARIANT=avx512 \
//       -DNA_VARIANT_avx512=1 -c $K/kernels.cpp -o /tmp/k512.o
//   g++ $F -mavx2 -mfma -mf16c -DNA_VARIANT=avx2 -DNA_VARIANT_avx2=1 -c $K/kernels.cpp -o /tmp/k2.o
//   g++ $F -DNA_VARIANT=base -DNA_VARIANT_base=1 -c $K/kernels.cpp -o /tmp/kb.o
//   g++ $F -mavx2 -mfma benchmarks/nanobind/fwd2_harness.cpp /tmp/k512.o /tmp/k2.o /tmp/kb.o -o /tmp/fh
//   for w in 0 1 2; do /tmp/fh $w; done
#include "kernels.h"
#include <chrono>
#include <vector>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <cstdlib>
// the border blocks' scores as the extension runs them on AMD (select_kernels: perm_al there only)
namespace na { bool perm_al = true; }
using namespace na;
int main(int argc, char** argv) {
  const KernelTable& kt = *kernels_avx512();
  const int L = 64, K = 7, D = 32, R = 11, front = 16, VW = 16;
  const int64_t ld = front + R * L + 64 + 1 * 16;  // as the ring: one line past a multiple of 16
  int which = argc > 1 ? atoi(argv[1]) : 0;  // 0 interior blocks only, 1 border only, 2 all four
  std::vector<float> kT(D * ld + 64), vT(D * ld + 64);
  for (size_t i = 0; i < kT.size(); ++i) { kT[i] = (i % 13) * 0.01f; vT[i] = (i % 7) * 0.01f; }
  for (int d = 0; d < D; ++d) for (int j = 0; j < front; ++j) kT[d * ld + j] = vT[d * ld + j] = 0;
  float* q = (float*)aligned_alloc(64, 2 * (D * VW + VW) * 4);
  for (int i = 0; i < 2 * (D * VW + VW); ++i) q[i] = (i % 11) * 0.01f;
  std::vector<float> S0(64 * 1024), S1(64 * 1024), o(2 * (D * VW + VW) + 64);
  auto ws = [&](int c) { return std::min(std::max(c - K / 2, 0), L - K); };
  double best = 1e30; long flops = 0;
  for (int rep = 0; rep < 1500; ++rep) {
    long f = 0;
    auto t0 = std::chrono::steady_clock::now();
    for (int y = 0; y < L; y += 2) {
      int64_t ra[7], rb[7];
      for (int i = 0; i < 7; ++i) { ra[i] = front + ((ws(y) + i) % R) * L; rb[i] = front + ((ws(y + 1) + i) % R) * L; }
      for (int blk = 0; blk < 4; ++blk) {
        const bool border = blk == 0 || blk == 3;
        if ((which == 0 && border) || (which == 1 && !border)) continue;
        int lohi[32]; const int* lh = nullptr;
        int base = 1 << 30, nx = K;
        for (int l = 0; l < VW; ++l) base = std::min(base, ws(16 * blk + l) - l);
        if (border) {
          int mx = 0;
          for (int l = 0; l < VW; ++l) { lohi[l] = ws(16 * blk + l) - l - base; lohi[VW + l] = lohi[l] + K; mx = std::max(mx, lohi[VW + l]); }
          nx = mx; lh = lohi;
        }
        int64_t rba[7], rbb[7];
        for (int i = 0; i < 7; ++i) { rba[i] = ra[i] + base; rbb[i] = rb[i] + base; }
        float* qa = q; float* qb = q + D * VW + VW;
        float* oa = o.data(); float* ob = o.data() + D * VW + VW;
        kt.exact_fwd2(qa, qb, VW, 0.17f, D, kT.data(), ld, vT.data(), ld, D, rba, 7, rbb, 7, nx, lh, S0.data(), S1.data(),
                      oa, ob, oa + D * VW, ob + D * VW);
        f += 2L * 16 * 49 * 64 * 2;
      }
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s); flops = f;
  }
  printf("which %d: %.1f us per slice, %.1f GFLOP/s (o %g)\n", which, best * 1e6, flops / best * 1e-9, o[5]);
}
