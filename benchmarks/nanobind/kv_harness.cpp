// The extension's own backward key side in isolation (the twenty-second pass, RESULTS.md): kt.exact_bwd_kv2
// from kernels.o, compiled as the wheel compiles it, over one slice of C2 (64x64 queries, K 7x7, D = Dv = 32)
// in row pairs as the driver's exact_row calls it: for each pair, the key rows both windows hold in one call
// (two sources), then each row's own, for dK (dS and the scaled queries) and dV (P and the output gradients);
// the weights, operands and sums laid out as the driver lays them (slot rows lds = 1 mod 16 apart, key rows ldr
// apart, sums in a ring of 11 key-row slots), all hot in L1/L2: the loop's own rate, in GFLOP/s per core of
// the useful FLOPs (2 * 49 * 64 per query; the slots outside a query's window are zeros the kernel multiplies
// too). Not built by the package; from the repository root, on an AVX-512 machine (the three kernels.o as for
// fwd2_harness.cpp):
//
//   g++ $F -mavx2 -mfma benchmarks/nanobind/kv_harness.cpp /tmp/k512.o /tmp/k2.o /tmp/kb.o -o /tmp/kvh && /tmp/kvh
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels.h"
namespace na {
bool perm_al = true;
}
using namespace na;
int main(int argc, char** argv) {
  const KernelTable& kt = *kernels_avx512();
  const int L = 64, K = 7, D = 32, VW = 16, RING = 11, front = 16;
  // the driver's row_slots for C2: slot offsets d = key - query in [dlo, dhi), per key vector [lo, hi)
  const int dlo = -6, dhi = 7, nd = dhi - dlo, nvec = L / VW;
  const int vr[8] = {3, 13, 3, 10, 3, 10, 0, 10};
  const int64_t padA = dlo + ((std::max(dhi, 1) - dlo + 15) / 16) * 16;
  const int64_t lds = ((padA + nvec * VW + std::max(-dlo, 0) + VW + 15) / 16) * 16 + 1;
  const int64_t ldr = ((nd * lds + 15) / 16) * 16, o = padA - dlo;
  const int64_t ldacc = front + RING * L + 64 + 16;
  const int reps = argc > 1 ? atoi(argv[1]) : 400;
  auto ws = [&](int c) { return std::min(std::max(c - K / 2, 0), L - K); };
  auto buf = [](size_t n) {
    float* p = static_cast<float*>(aligned_alloc(64, ((n * 4 + 63) / 64) * 64));
    for (size_t i = 0; i < n; ++i) p[i] = (i % 17) * 0.01f;
    return p;
  };
  // per query row of the pair: P and dS [key row][slot][lds], queries and output gradients [D][lds]
  float *pt[2], *dsb[2], *xq[2], *xo[2];
  for (int i = 0; i < 2; ++i) {
    pt[i] = buf(8 * (nd + 1) * lds + 64);
    dsb[i] = buf(8 * (nd + 1) * lds + 64);
    xq[i] = buf(D * lds + 64) + 1;  // std::vector's 16-byte alignment, as in the driver
    xo[i] = buf(D * lds + 64) + 1;
  }
  float* acc = buf(2 * D * ldacc + 64);
  double best = 1e30;
  for (int rep = 0; rep < reps; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int y = 0; y < L; y += 2) {
      // key rows of each window and their index in it
      std::vector<int64_t> both, one[2];
      std::vector<const float*> p0, p1, q0;
      std::vector<int> i0s, i1s, ones[2];
      const int a = ws(y), b = ws(y + 1);
      for (int r = std::min(a, b); r < std::max(a, b) + K; ++r) {
        const bool ina = r >= a && r < a + K, inb = r >= b && r < b + K;
        const int64_t base = front + (r % RING) * L;
        if (ina && inb) {
          both.push_back(base);
          i0s.push_back(r - a);
          i1s.push_back(r - b);
        } else {
          one[ina ? 0 : 1].push_back(base);
          ones[ina ? 0 : 1].push_back(ina ? r - a : r - b);
        }
      }
      for (int side = 0; side < 2; ++side) {
        float* ac = side ? acc + D * ldacc : acc;
        float* const* w = side ? pt : dsb;
        float* const* x = side ? xo : xq;
        p0.clear();
        p1.clear();
        for (size_t j = 0; j < both.size(); ++j) {
          p0.push_back(w[0] + o + i0s[j] * ldr);
          p1.push_back(w[1] + o + i1s[j] * ldr);
        }
        kt.exact_bwd_kv2(p0.data(), p1.data(), lds, x[0] + o, x[1] + o, lds, D, ac, ldacc, both.data(),
                         static_cast<int>(both.size()), nd, nvec * VW, vr);
        for (int i = 0; i < 2; ++i) {
          if (one[i].empty()) continue;
          q0.clear();
          for (int r : ones[i]) q0.push_back(w[i] + o + r * ldr);
          kt.exact_bwd_kv2(q0.data(), nullptr, lds, x[i] + o, nullptr, lds, D, ac, ldacc, one[i].data(),
                           static_cast<int>(one[i].size()), nd, nvec * VW, vr);
        }
      }
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, dt);
  }
  const double flops = 2.0 * 49 * 64 * L * L;
  std::printf("key side, one slice of C2: %.1f us, %.1f GFLOP/s per core (useful FLOPs)\n", best * 1e6,
              flops / best * 1e-9);
  return 0;
}
