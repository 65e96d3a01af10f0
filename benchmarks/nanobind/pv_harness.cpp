// A model of the forward's P.V read from heads-last value rows (the twenty-first pass, RESULTS.md): 16
// queries (lanes) of one block, 7 key rows, 7 slots (interior: lane l's slot x is key l + x), Dv = 32, value
// rows heads-last (4 heads x 32 features per token, 512 bytes apart), outputs as rows. Three forms, in
// GFLOP/s on one core with hot data:
//   row-form:   8 lanes x 32 features per pass (16 accumulators), each key's value row loaded once for every
//               lane whose window holds it, P broadcast per (lane, slot): the interior blocks' band;
//   row-form16: 16 lanes x 16 features per pass;
//   lane-form:  the extension's layout (values transposed, [32][tokens], slots by valignd) for one block,
//               8 features per pass (the extension's slot_sums2s shares them over a pair of rows);
//   border per-lane: a border block lane by lane (lane l's slots start at key p[l]; no row shared).
// Not built by the package:  g++ -O3 -std=c++20 -mavx512f -mavx512vl -mfma -Wno-psabi pv_harness.cpp -o /tmp/pv
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <utility>
#include <algorithm>
#include <cmath>
typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
static inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline vf splat(float x) { return vf{} + x; }

// 8 lanes L0..L0+7 of one block, both feature halves (Dv = 32): acc[l][h]
template <int NX, int L0>
__attribute__((always_inline)) inline void pv8(const float* P, const float* const* vrow, int nrows, int64_t vs, vf (*acc)[2]) {
  for (int i = 0; i < nrows; ++i) {
    const float* pr = P + i * NX * 16;
    const float* vr = vrow[i] + L0 * vs;
#pragma GCC unroll 32
    for (int j = 0; j < NX + 7; ++j) {
      const vf v0 = load(vr + j * vs), v1 = load(vr + j * vs + 16);
#pragma GCC unroll 8
      for (int l = 0; l < 8; ++l) {
        const int x = j - l;
        if (x < 0 || x >= NX) continue;
        const vf p = splat(pr[x * 16 + L0 + l]);
        acc[l][0] += p * v0;
        acc[l][1] += p * v1;
      }
    }
  }
}
template <int NX>
__attribute__((noinline)) void pv_block(const float* P, const float* const* vrow, int nrows, int64_t vs, const float* mul, float* out, int64_t os) {
  {
    vf acc[8][2] = {};
    pv8<NX, 0>(P, vrow, nrows, vs, acc);
    for (int l = 0; l < 8; ++l) { store(out + l * os, acc[l][0] * mul[l]); store(out + l * os + 16, acc[l][1] * mul[l]); }
  }
  {
    vf acc[8][2] = {};
    pv8<NX, 8>(P, vrow, nrows, vs, acc);
    for (int l = 0; l < 8; ++l) { store(out + (8 + l) * os, acc[l][0] * mul[8 + l]); store(out + (8 + l) * os + 16, acc[l][1] * mul[8 + l]); }
  }
}

template <int X>
__attribute__((always_inline)) inline vf shifted(vf lo, vf hi) {
  if constexpr (X == 0) return lo;
  else return vf(_mm512_alignr_epi32(__m512i(hi), __m512i(lo), X));
}
template <int NX, int... X>
__attribute__((always_inline)) inline void lane8(std::integer_sequence<int, X...>, const float* P, const float* vT, int64_t ld, const int64_t* rb, int nrows, vf* acc) {
  for (int i = 0; i < nrows; ++i) {
    const float* pr = P + i * NX * 16;
    vf lo[8], hi[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) { lo[c] = load(vT + c * ld + rb[i]); hi[c] = load(vT + c * ld + rb[i] + 16); }
    auto step = [&](auto xc) __attribute__((always_inline)) {
      constexpr int x = decltype(xc)::value;
      const vf p = load(pr + x * 16);
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) acc[c] += p * shifted<x>(lo[c], hi[c]);
    };
    (step(std::integral_constant<int, X>{}), ...);
  }
}
template <int NX>
__attribute__((noinline)) void lane_block(const float* P, const float* vT, int64_t ld, const int64_t* rb, int nrows, vf mul, float* oT) {
  for (int c0 = 0; c0 < 32; c0 += 8) {
    vf acc[8] = {};
    lane8<NX>(std::make_integer_sequence<int, NX>{}, P, vT + c0 * ld, ld, rb, nrows, acc);
    for (int c = 0; c < 8; ++c) store(oT + (c0 + c) * 16, acc[c] * mul);
  }
}
// 16 lanes, one feature half at a time
template <int NX>
__attribute__((noinline)) void pv_block16(const float* P, const float* const* vrow, int nrows, int64_t vs, const float* mul, float* out, int64_t os) {
  for (int h = 0; h < 2; ++h) {
    vf acc[16] = {};
    for (int i = 0; i < nrows; ++i) {
      const float* pr = P + i * NX * 16;
      const float* vr = vrow[i] + h * 16;
#pragma GCC unroll 32
      for (int j = 0; j < NX + 15; ++j) {
        const vf v0 = load(vr + j * vs);
#pragma GCC unroll 16
        for (int l = 0; l < 16; ++l) {
          const int x = j - l;
          if (x < 0 || x >= NX) continue;
          acc[l] += splat(pr[x * 16 + l]) * v0;
        }
      }
    }
    for (int l = 0; l < 16; ++l) store(out + l * os + h * 16, acc[l] * mul[l]);
  }
}

// border form: lane l's slot x' is key p[l] + x' (x' < n), weights P[(i*n + x')*16 + l]; 8 lanes at a time, 2 halves
template <int NL>
__attribute__((always_inline)) inline void lanes_pv(const float* P, const float* const* vrow, int nrows, int n, int64_t vs, const int* p, int L0, vf (*acc)[2]) {
  for (int i = 0; i < nrows; ++i) {
    const float* pr = P + i * n * 16 + L0;
    const float* vr[NL];
#pragma GCC unroll 8
    for (int l = 0; l < NL; ++l) vr[l] = vrow[i] + p[L0 + l] * vs;
    for (int x = 0; x < n; ++x) {
#pragma GCC unroll 8
      for (int l = 0; l < NL; ++l) {
        const vf w = splat(pr[x * 16 + l]);
        acc[l][0] += w * load(vr[l] + x * vs);
        acc[l][1] += w * load(vr[l] + x * vs + 16);
      }
    }
  }
}
__attribute__((noinline)) void pv_border(const float* P, const float* const* vrow, int nrows, int n, int64_t vs, const int* p, const float* mul, float* out, int64_t os) {
  for (int L0 = 0; L0 < 16; L0 += 4) {
    vf acc[4][2] = {};
    lanes_pv<4>(P, vrow, nrows, n, vs, p, L0, acc);
    for (int l = 0; l < 4; ++l) { store(out + (L0 + l) * os, acc[l][0] * mul[L0 + l]); store(out + (L0 + l) * os + 16, acc[l][1] * mul[L0 + l]); }
  }
}
int main(int argc, char** argv) {
  const int NXr = 7, nrows = 7;
  const int64_t vs = 128;  // heads-last: H*D floats per token
  const int ntok = 64 * 16;
  std::vector<float> V(ntok * vs + 64), P(nrows * NXr * 16), out(16 * vs), mul(16, 1.f);
  for (auto& x : V) x = rand() / float(RAND_MAX);
  for (auto& x : P) x = rand() / float(RAND_MAX);
  const float* vrow[16];
  for (int i = 0; i < nrows; ++i) vrow[i] = V.data() + i * 64 * vs + 5 * vs;
  // reference
  std::vector<double> ref(16 * 32, 0.);
  for (int l = 0; l < 16; ++l) for (int i = 0; i < nrows; ++i) for (int x = 0; x < NXr; ++x) for (int c = 0; c < 32; ++c)
    ref[l * 32 + c] += P[(i * NXr + x) * 16 + l] * vrow[i][(l + x) * vs + c];
  pv_block<7>(P.data(), vrow, nrows, vs, mul.data(), out.data(), vs);
  double err = 0; for (int l = 0; l < 16; ++l) for (int c = 0; c < 32; ++c) err = std::max(err, std::abs(ref[l*32+c] - out[l*vs+c]));
  printf("max err %g\n", err);
  const int64_t ld = 64 * 8 + 16;
  std::vector<float> vT(32 * ld + 64), oT(32 * 16);
  for (auto& x : vT) x = rand() / float(RAND_MAX);
  int64_t rb[16]; for (int i = 0; i < nrows; ++i) rb[i] = i * 64 + 5;
  const int iters = 200000;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < iters; ++it) { pv_block<7>(P.data(), vrow, nrows, vs, mul.data(), out.data(), vs); asm volatile("" ::: "memory"); }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("row-form PV NX=7 rows=7: %.1f GFLOP/s\n", 2.0 * 16 * nrows * NXr * 32 * iters / s * 1e-9);
    t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < iters; ++it) { pv_block16<7>(P.data(), vrow, nrows, vs, mul.data(), out.data(), vs); asm volatile("" ::: "memory"); }
    s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("row-form16 PV: %.1f GFLOP/s\n", 2.0 * 16 * nrows * NXr * 32 * iters / s * 1e-9);
    t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < iters; ++it) { lane_block<7>(P.data(), vT.data(), ld, rb, nrows, splat(1.f), oT.data()); asm volatile("" ::: "memory"); }
    s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("lane-form PV: %.1f GFLOP/s\n", 2.0 * 16 * nrows * NXr * 32 * iters / s * 1e-9);
    int pp[16]; for (int l = 0; l < 16; ++l) pp[l] = l < 4 ? 0 : l - 3;
    t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < iters; ++it) { pv_border(P.data(), vrow, nrows, 7, vs, pp, mul.data(), out.data(), vs); asm volatile("" ::: "memory"); }
    s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("border per-lane PV: %.1f GFLOP/s\n", 2.0 * 16 * nrows * NXr * 32 * iters / s * 1e-9);
  }
}
