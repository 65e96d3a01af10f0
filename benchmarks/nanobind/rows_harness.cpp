// A model of the exact path's score loop (not the extension's own code): R query rows' blocks of 16 lanes
// share each key row's two loads and its NX shifted key vectors, NX slots per chunk, D = 32, eight key rows
// per call, in L1/L2. Three ways to shift the keys per slot: valignd (the runs' slots, `exact_scores_run2`),
// a two-table permute (lane_perm's slots of border blocks, `perm_scores2` / `perm_sums2s`), and valignd
// blended with a broadcast key for clamped lanes (an idea, not in the extension). GFLOP/s per (R, NX): how
// much more query rows per key row would give (the twentieth pass, RESULTS.md). Not built by the package;
// from the repository root, on an AVX-512 machine:
//
//   g++ -std=c++20 -O3 -mavx512f -mavx512vl -mavx512bw -mavx512dq -mfma \
//       benchmarks/nanobind/rows_harness.cpp -o /tmp/rows_harness && /tmp/rows_harness
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <utility>
typedef float vf __attribute__((vector_size(64)));
// how slot x's key vector is made from a key row's 32 keys (lo, hi)
enum class Shift { alignr, perm, blend };
static inline vf load(const float* p) { return *reinterpret_cast<const vf __attribute__((aligned(4)))*>(p); }
template <int X> static inline vf sh(vf lo, vf hi) {
  if constexpr (X == 0) return lo;
  else return vf(_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(__m512(hi)), _mm512_castps_si512(__m512(lo)), X)));
}
template <int R, int NX, Shift S, int... X>
__attribute__((always_inline)) static inline void step(std::integer_sequence<int, X...>, const vf* qv, const float* kr, vf (*a)[NX], const __m512i* ix) {
  vf lo = load(kr);
  vf hi = vf(_mm512_maskz_loadu_ps((__mmask16)((1u << (NX - 1)) - 1), kr + 16));
  asm("" : "+v"(lo), "+v"(hi));
  auto one = [&](auto xc) {
    constexpr int x = decltype(xc)::value;
    vf k;
    if constexpr (S == Shift::alignr) k = sh<x>(lo, hi);
    else if constexpr (S == Shift::perm) k = vf(_mm512_permutex2var_ps(__m512(lo), ix[x], __m512(hi)));
    // (lanes 0-2 clamped to one window, as a left border block of K = 7)
    else k = vf(_mm512_mask_blend_ps((__mmask16)0x7, __m512(sh<x>(lo, hi)), _mm512_set1_ps(kr[x])));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r][x] += qv[r] * k;
  };
  (one(std::integral_constant<int, X>{}), ...);
}
template <int R, int NX, Shift S>
__attribute__((noinline)) void scores(const float* q, int64_t ldq, int D, const float* k, int64_t ldk, int nrows, float* out, const __m512i* ix) {
  for (int row = 0; row < nrows; ++row) {
    vf a[R][NX];
    for (int r = 0; r < R; ++r) for (int x = 0; x < NX; ++x) a[r][x] = vf{};
    const float* kb = k + row * 64;
    for (int d = 0; d < D; ++d) {
      vf qv[R];
      for (int r = 0; r < R; ++r) qv[r] = load(q + r * 16 + d * ldq);
      step<R, NX, S>(std::make_integer_sequence<int, NX>{}, qv, kb + d * ldk, a, ix);
    }
    for (int r = 0; r < R; ++r) for (int x = 0; x < NX; ++x) *reinterpret_cast<vf*>(out + (r * NX + x) * 16) += a[r][x];
  }
}
template <int R, int NX, Shift S = Shift::alignr>
double bench() {
  const int D = 32, nrows = 8;
  const int64_t ldq = 64, ldk = 8 * 64 + 32;
  float* q = (float*)aligned_alloc(64, 4 * D * ldq * 4 + 256);
  float* k = (float*)aligned_alloc(64, D * ldk * 4 + 256);
  float* out = (float*)aligned_alloc(64, R * NX * 16 * 4 + 256);
  for (int i = 0; i < 4 * D * ldq; ++i) q[i] = (i % 7) * 1e-3f;
  for (int i = 0; i < D * ldk; ++i) k[i] = (i % 5) * 1e-3f;
  for (int i = 0; i < R * NX * 16; ++i) out[i] = 0;
  alignas(64) __m512i ix[16];
  for (int x = 0; x < 16; ++x) ix[x] = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 3, 3, 3), _mm512_set1_epi32(x));
  const int iters = 200000 / R;
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < iters; ++it) scores<R, NX, S>(q, ldq, D, k, ldk, nrows, out, ix);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  const double flops = 2.0 * 16 * R * NX * D * nrows * iters;
  std::printf("  R=%d NX=%d: %.1f GFLOP/s (sum %g)\n", R, NX, flops / best * 1e-9, out[0]);
  return flops / best;
}
int main() {
  std::printf("alignr: valignd by the slot (the runs' slots, exact_scores_run2)\n");
  bench<1, 7>(); bench<2, 5>(); bench<2, 7>(); bench<2, 8>(); bench<3, 7>(); bench<4, 5>();
  std::printf("perm: a two-table permute per slot (lane_perm's slots, perm_scores2 / perm_sums2s)\n");
  bench<1, 7, Shift::perm>(); bench<2, 7, Shift::perm>(); bench<3, 7, Shift::perm>(); bench<4, 5, Shift::perm>();
  std::printf("blend: valignd + the clamped lanes' key broadcast + a masked blend (not in the extension)\n");
  bench<1, 7, Shift::blend>(); bench<2, 7, Shift::blend>(); bench<4, 5, Shift::blend>();
}
