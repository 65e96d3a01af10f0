// Compiled once per NA_VARIANT with that variant's -m flags (CMakeLists.txt). Written with GCC/Clang
// vector extensions so that the same text becomes AVX-512, AVX2, SSE2 or NEON code.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels.h"

#if defined(NA_VARIANT_avx2) || defined(NA_VARIANT_avx512)
#include <immintrin.h>
#endif

#if defined(NA_VARIANT_avx512)
#define NA_VW 16
#define NA_MR 8
#define NA_TABLE kernels_avx512
#ifndef NA_ALIGNR_PV
#define NA_ALIGNR_PV 4
#endif
#ifndef NA_ALIGNR_MIN
#define NA_ALIGNR_MIN 2
#endif
#elif defined(NA_VARIANT_avx2)
#define NA_VW 8
#define NA_MR 6
#define NA_TABLE kernels_avx2
#else
#define NA_VW 8
#define NA_MR 4
#define NA_TABLE kernels_base
#endif

namespace na {
namespace {

constexpr int VW = NA_VW;
constexpr int MR = NA_MR;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int vi __attribute__((vector_size(VW * 4)));
// same vectors with 4-byte alignment: loads and stores through them are unaligned accesses
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }
// a load kept in a register: GCC folds a load into each FMA that uses it (one memory operand per
// FMA), which undoes any sharing of one load between FMAs; the empty asm makes the value opaque
inline vf load_reg(const float* p) {
  vf v = load(p);
#if defined(NA_VARIANT_avx512) || defined(NA_VARIANT_avx2)
  asm("" : "+x"(v));
#endif
  return v;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < VW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) / 2^n for n = round(x log2 e): the reduced argument r = x - n ln 2 (in two parts) and the
// polynomial of vexp below
inline vf vexp_poly(vf x, vf n) {
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  return p * r * r + r + 1.0f;
}

// exp by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' expf coefficients),
// relative error ~2e-7. Below -87.3 the result is 0; NaN stays NaN.
inline vf vexp(vf x) {
#if defined(NA_VARIANT_avx512)
  // the same steps with AVX-512's rounding (vrndscaleps) and 2^n scaling (vscalefps) instead of the
  // clamps, the magic-number rounding and the exponent arithmetic (the same n and polynomial: the
  // same results wherever the result is normal). `keep` holds the lanes not below -87.3 (NaN included:
  // it stays NaN, and min returns its second operand for a NaN); the others (-inf included) are zeroed
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const vf xn = vf(_mm512_min_ps(_mm512_set1_ps(88.72283f), x));
  const vf n = vf(_mm512_roundscale_ps(__m512(xn * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const vf p = vexp_poly(xn, n);
  return vf(_mm512_maskz_scalef_ps(keep, __m512(p), __m512(n)));
#else
  const vf lo = splat(-87.33654f), hi = splat(88.72283f);
  vi under = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  vf t = x * 1.44269504088896341f + magic;
  vf n = t - magic;
  vi ni = (vi)t - (vi)splat(magic);
  const vf p = vexp_poly(x, n);
  vf scale = (vf)((ni + 127) << 23);
  vf y = p * scale;
  return (vf)((vi)y & ~under);
#endif
}
// natural log of normal positive x (Cephes' logf: frexp, then a degree-8 polynomial on
// [sqrt(1/2) - 1, sqrt(2) - 1]), relative error ~1e-7; callers keep zero, inf and NaN away from it
inline vf vlog(vf x) {
  const vi bits = (vi)x;
  vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // x = m * 2^e, m in [0.5, 1)
  const vi small = m < 0.707106781186547524f;
  e = small ? e - 1.f : e;
  m = small ? m + m - 1.f : m - 1.f;
  const vf z = m * m;
  vf y = splat(7.0376836292E-2f);
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y -= 0.5f * z;
  return m + y + e * 0.693359375f;
}

template <int M, int NV>
inline void micro(int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  vf c[M][NV];
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[i][v] = acc ? load(C + i * ldc + v * VW) : vf{};
  for (int k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * VW);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      vf a = splat(A[i * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + i * ldc + v * VW, c[i][v]);
}

template <int NV>
inline void micro_rows(int m, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool acc) {
  switch (m) {
#define NA_CASE(R) \
  case R: micro<R, NV>(K, A, lda, B, ldb, C, ldc, acc); break;
    NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4)
#if NA_MR > 4
    NA_CASE(5) NA_CASE(6)
#endif
#if NA_MR > 6
    NA_CASE(7) NA_CASE(8)
#endif
#undef NA_CASE
    default: break;
  }
}

void gemm(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
          bool acc) {
  for (int i0 = 0; i0 < M; i0 += MR) {
    int m = M - i0 < MR ? M - i0 : MR;
    const float* a = A + i0 * lda;
    float* c = C + i0 * ldc;
    int j = 0;
    for (; j + 2 * VW <= N; j += 2 * VW) micro_rows<2>(m, K, a, lda, B + j, ldb, c + j, ldc, acc);
    for (; j + VW <= N; j += VW) micro_rows<1>(m, K, a, lda, B + j, ldb, c + j, ldc, acc);
    for (; j < N; ++j)
      for (int i = 0; i < m; ++i) {
        float s = acc ? c[i * ldc + j] : 0.f;
        for (int k = 0; k < K; ++k) s += a[i * lda + k] * B[k * ldb + j];
        c[i * ldc + j] = s;
      }
  }
}

inline vi lanes() {
  vi r;
  for (int i = 0; i < VW; ++i) r[i] = i;
  return r;
}

// y += a * x over whole vectors; past n, y's lanes are written back unchanged
void axpy_pad(float* y, float a, const float* x, int n) {
  int i = 0;
  for (; i + VW <= n; i += VW) store(y + i, load(y + i) + a * load(x + i));
  if (i < n) {
    vf yv = load(y + i);
    store(y + i, lanes() < (n - i) ? yv + a * load(x + i) : yv);
  }
}

void add_pad(float* y, const float* x, int n) { axpy_pad(y, 1.f, x, n); }

float dot(const float* a, const float* b, int n) {
  vf s0 = vf{}, s1 = vf{};
  int i = 0;
  for (; i + 2 * VW <= n; i += 2 * VW) {
    s0 += load(a + i) * load(b + i);
    s1 += load(a + i + VW) * load(b + i + VW);
  }
  for (; i + VW <= n; i += VW) s0 += load(a + i) * load(b + i);
  float t = hsum(s0 + s1);
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

void axpy(float* y, float a, const float* x, int n) {
  int i = 0;
  for (; i + VW <= n; i += VW) store(y + i, load(y + i) + a * load(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

// slot_dots: four slots per pass share the query's loads
void slot_dots(const float* q, const float* const* rows, int ns, int n, float scale, float* out) {
  int s = 0;
  for (; s + 4 <= ns; s += 4) {
    const float* r[4];
    bool all = true;
    for (int j = 0; j < 4; ++j) all = all && rows[s + j];
    if (!all) {  // a masked slot among them: one at a time
      for (int j = 0; j < 4; ++j) out[s + j] = rows[s + j] ? scale * dot(q, rows[s + j], n) : -INFINITY;
      continue;
    }
    for (int j = 0; j < 4; ++j) r[j] = rows[s + j];
    vf a0{}, a1{}, a2{}, a3{};
    int i = 0;
    for (; i + VW <= n; i += VW) {
      const vf qv = load(q + i);
      a0 += qv * load(r[0] + i);
      a1 += qv * load(r[1] + i);
      a2 += qv * load(r[2] + i);
      a3 += qv * load(r[3] + i);
    }
    float t[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (; i < n; ++i)
      for (int j = 0; j < 4; ++j) t[j] += q[i] * r[j][i];
    for (int j = 0; j < 4; ++j) out[s + j] = scale * t[j];
  }
  for (; s < ns; ++s) out[s] = rows[s] ? scale * dot(q, rows[s], n) : -INFINITY;
}

// slot_axpys: up to four vectors of y held in registers over all slots
void slot_axpys(const float* w, const float* const* rows, int ns, int n, float* y) {
  int i = 0;
  for (; i + 4 * VW <= n; i += 4 * VW) {
    vf a0{}, a1{}, a2{}, a3{};
    for (int s = 0; s < ns; ++s) {
      if (!rows[s]) continue;
      const vf ws = splat(w[s]);
      const float* r = rows[s] + i;
      a0 += ws * load(r);
      a1 += ws * load(r + VW);
      a2 += ws * load(r + 2 * VW);
      a3 += ws * load(r + 3 * VW);
    }
    store(y + i, a0);
    store(y + i + VW, a1);
    store(y + i + 2 * VW, a2);
    store(y + i + 3 * VW, a3);
  }
  for (; i + VW <= n; i += VW) {
    vf a{};
    for (int s = 0; s < ns; ++s)
      if (rows[s]) a += splat(w[s]) * load(rows[s] + i);
    store(y + i, a);
  }
  for (; i < n; ++i) {
    float a = 0.f;
    for (int s = 0; s < ns; ++s)
      if (rows[s]) a += w[s] * rows[s][i];
    y[i] = a;
  }
}

void pack_kt(float* KT, int64_t NP, const float* kT, int64_t ldk, const int64_t* tok, int64_t rows, int nk,
             int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    float* dst = KT + d * NP;
    const float* src = kT + d * ldk;
    for (int64_t r = 0; r < rows; ++r) {
      const float* s = src + tok[r];
      float* o = dst + r * nk;
      for (int x = 0; x < nk; x += VW) store(o + x, load(s + x));
    }
  }
}

typedef int viu __attribute__((vector_size(VW * 4), aligned(4)));
inline vi loadiu(const int* p) { return *reinterpret_cast<const viu*>(p); }

inline vi valid_at(const int* const* c, const int* always, const int* lo, const int* hi, int j) {
  vi v = loadiu(always + j);
  vi in = (loadiu(c[0] + j) >= lo[0]) & (loadiu(c[0] + j) < hi[0]) & (loadiu(c[1] + j) >= lo[1]) &
          (loadiu(c[1] + j) < hi[1]) & (loadiu(c[2] + j) >= lo[2]) & (loadiu(c[2] + j) < hi[2]);
  return v | in;
}

float masked_max(const float* s, const int* const* c, const int* always, const int* lo, const int* hi, int n) {
  vf vm = splat(-INFINITY);
  for (int j = 0; j < n; j += VW) {
    vf v = load(s + j);
    v = valid_at(c, always, lo, hi, j) ? v : splat(-INFINITY);
    vm = v > vm ? v : vm;
  }
  return hmax(vm);
}

float masked_exp(float* p, const float* s, const int* const* c, const int* always, const int* lo, const int* hi, int n,
                 float shift) {
  vf sum = vf{};
  for (int j = 0; j < n; j += VW) {
    vf e = vexp(load(s + j) - shift);
    e = valid_at(c, always, lo, hi, j) ? e : vf{};
    store(p + j, e);
    sum += e;
  }
  return hsum(sum);
}

void masked_ds(float* ds, const float* p, const float* dp, float cst, const int* const* c, const int* always,
               const int* lo, const int* hi, int n) {
  for (int j = 0; j < n; j += VW) {
    vf v = load(p + j) * (load(dp + j) - cst);
    store(ds + j, valid_at(c, always, lo, hi, j) ? v : vf{});
  }
}

// every lane: the max / the sum of v's lanes (three shuffle steps instead of a chain of VW scalar ops)
inline vf bcast_max(vf v) {
#if defined(NA_VARIANT_avx2)
  __m256 t = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
  t = _mm256_max_ps(t, _mm256_shuffle_ps(t, t, 0x4E));
  return _mm256_max_ps(t, _mm256_shuffle_ps(t, t, 0xB1));
#else
  return splat(hmax(v));
#endif
}
inline vf bcast_sum(vf v) {
#if defined(NA_VARIANT_avx2)
  __m256 t = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 1));
  t = _mm256_add_ps(t, _mm256_shuffle_ps(t, t, 0x4E));
  return _mm256_add_ps(t, _mm256_shuffle_ps(t, t, 0xB1));
#else
  return splat(hsum(v));
#endif
}

// the max / the sum of v's lanes as one float: AVX-512's reduction sequences, bcast_max / bcast_sum's
// shuffles with AVX2 (a tree of a few steps instead of a chain of vw scalar ones per row)
inline float tree_max(vf v) {
#if defined(NA_VARIANT_avx512)
  return _mm512_reduce_max_ps(__m512(v));
#else
  return bcast_max(v)[0];
#endif
}
inline float tree_sum(vf v) {
#if defined(NA_VARIANT_avx512)
  return _mm512_reduce_add_ps(__m512(v));
#else
  return bcast_sum(v)[0];
#endif
}

// masked_max + masked_exp / masked_exp + masked_ds for tile rows whose queries' windows are the whole box
// (DiNAT's dilation groups of K, NAT's K x K maps): every column below ncol is valid (the box's keys, then
// the extra keys), the padding up to n is not, so the window test is one compare per vector instead of six
// table loads and compares. The same exps, sums and selects as the masked kernels.
// rows rows of S (ld apart): P = exp(S - m) on the valid columns (0 on the padding), m the max of the valid
// scores (0 where none is a number, as the masked path); lse[r] = m + log(sum) (a vector log for vw rows at
// once where 1 <= sum < inf, std::log otherwise), inv[r] = 1 / sum
void full_softmax(float* P, const float* S, int64_t ld, int rows, int n, int ncol, float* lse, float* inv) {
  const vi ids = lanes();
  for (int r0 = 0; r0 < rows; r0 += VW) {
    const int nr = rows - r0 < VW ? rows - r0 : VW;
    vf mv = vf{}, sv = splat(1.f);
    for (int i = 0; i < nr; ++i) {
      const float* s = S + (r0 + i) * ld;
      float* p = P + (r0 + i) * ld;
      vf vm = splat(-INFINITY);
      for (int j = 0; j < n; j += VW) {
        const vf v = (ids + j) < ncol ? load(s + j) : splat(-INFINITY);
        vm = v > vm ? v : vm;
      }
      float m = tree_max(vm);
      if (m == -INFINITY) m = 0.f;  // only NaN scores: let the NaN through exp
      vf sum = vf{};
      for (int j = 0; j < n; j += VW) {
        vf e = vexp(load(s + j) - m);
        e = (ids + j) < ncol ? e : vf{};
        store(p + j, e);
        sum += e;
      }
      mv[i] = m;
      sv[i] = tree_sum(sum);
    }
    const vf l = mv + vlog(sv);
    for (int i = 0; i < nr; ++i) {
      const float t = sv[i];
      lse[r0 + i] = t >= 1.f && t < INFINITY ? l[i] : mv[i] + std::log(t);
      inv[r0 + i] = 1.f / t;
    }
  }
}
// one row: p = exp(s - shift) on the valid columns (0 on the padding), c = sum p * dp - dlse (sum P dP is
// dO . O: no pass over the outputs), ds = p * (dp - c) on the valid columns, 0 on the padding
void full_p_ds(float* p, float* ds, const float* s, const float* dp, int n, int ncol, float shift, float dlse) {
  const vi ids = lanes();
  vf acc = vf{};
  for (int j = 0; j < n; j += VW) {
    const vf e = (ids + j) < ncol ? vexp(load(s + j) - shift) : vf{};
    store(p + j, e);
    acc += e * load(dp + j);
  }
  const float c = tree_sum(acc) - dlse;
  for (int j = 0; j < n; j += VW) {
    const vf v = load(p + j) * (load(dp + j) - c);
    store(ds + j, (ids + j) < ncol ? v : vf{});
  }
}

bool all_finite(const float* x, int64_t n) {
  // x * 0 is 0 for finite x and NaN for inf or NaN; NaN survives the sum
  vf s = vf{};
  int64_t i = 0;
  for (; i + VW <= n; i += VW) s += load(x + i) * 0.f;
  float t = hsum(s);
  for (; i < n; ++i) t += x[i] * 0.f;
  return t == 0.f;
}

// Exact windows of VW consecutive queries (one per lane) whose windows along the last axis start at
// consecutive keys: slot (r, x) of lane l is key rowbase[r] + x + l of kT [D][ldk] / vT [Dv][ldv], so
// every slot is one shifted vector load per feature (no box, no mask, no packing).
// Scores of slots x < NX of one key row: queries are scaled by the caller (before the products, as
// the tile path scales its packed queries)
// the running max of a softmax: m = v > m ? v : m over a chunk's slot vectors, folded in where the
// scores leave their registers (v > m ? v : m never takes a NaN, and max is order-free: the max the
// softmax took in a pass over the stored scores, up to the sign of a zero max, which neither
// exp(s - m) nor m + log(sum) can tell)
template <int NX>
__attribute__((always_inline)) inline void fold_max(const vf* a, vf* m) {
  if (!m) return;
  vf r = *m;
#pragma GCC unroll 16
  for (int x = 0; x < NX; ++x) r = a[x] > r ? a[x] : r;
  *m = r;
}
template <int NX>
inline void exact_scores_run(const float* qT, int64_t ldq, int64_t D, const float* kb, int64_t ldk, float* s,
                             vf* mx = nullptr) {
  vf acc[NX];
#pragma GCC unroll 8
  for (int x = 0; x < NX; ++x) acc[x] = vf{};
  // two features per trip: the loop's own instructions were 5 of 13 per feature at NX = 7
#pragma GCC unroll 2
  for (int64_t d = 0; d < D; ++d) {
    const vf qv = load(qT + d * ldq);
    const float* kr = kb + d * ldk;
#pragma GCC unroll 8
    for (int x = 0; x < NX; ++x) acc[x] += qv * load(kr + x);
  }
#pragma GCC unroll 8
  for (int x = 0; x < NX; ++x) store(s + x * VW, acc[x]);
  fold_max<NX>(acc, mx);
}

// acc[c] = sum over slots (r, x) of w[(r * nx + x) * VW] * src[c * ld + rowbase[r] + x] for C features
// (one vector per feature): the P.V of the forward and the dS.K of the backward. C independent
// accumulator chains: 8 keep both FMA pipes busy where 4 would wait on the FMA latency.
template <int C>
inline void slot_sum(const float* w, const float* src, int64_t ld, const int64_t* rowbase, int nrows, int nx, vf* out) {
  vf a[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) a[c] = vf{};
  for (int r = 0; r < nrows; ++r) {
    const float* s0 = src + rowbase[r];
    const float* wr = w + static_cast<int64_t>(r) * nx * VW;
    for (int x = 0; x < nx; ++x) {
      const vf p = load(wr + x * VW);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) a[c] += p * load(s0 + c * ld + x);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) out[c] = a[c];
}

// out [W][VW] = slot_sum over all W features, times mul
inline void slot_sums(const float* w, const float* src, int64_t ld, int64_t W, const int64_t* rowbase, int nrows,
                      int nx, vf mul, float* out) {
  int64_t c = 0;
  vf r[8];
  for (; c + 8 <= W; c += 8) {
    slot_sum<8>(w, src + c * ld, ld, rowbase, nrows, nx, r);
    for (int i = 0; i < 8; ++i) store(out + (c + i) * VW, r[i] * mul);
  }
  for (; c + 4 <= W; c += 4) {
    slot_sum<4>(w, src + c * ld, ld, rowbase, nrows, nx, r);
    for (int i = 0; i < 4; ++i) store(out + (c + i) * VW, r[i] * mul);
  }
  for (; c < W; ++c) {
    slot_sum<1>(w, src + c * ld, ld, rowbase, nrows, nx, r);
    store(out + c * VW, r[0] * mul);
  }
}

inline void scores_chunk1(int n, const float* q, int64_t ldq, int64_t D, const float* kb, int64_t ldk, float* s,
                          vf* mx = nullptr) {
  switch (n) {
#define NA_CASE(X) \
  case X: exact_scores_run<X>(q, ldq, D, kb, ldk, s, mx); break;
    NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
    default: break;
  }
}

// Masks a border block's slots, then turns scores into exp(s - m) in place; returns the lanes' sums, m in *mo
inline vf lane_softmax(float* s, int nrows, int nx, const int* lohi, vf* mo, const vf* mpre = nullptr) {
  const int n = nrows * nx;
  if (mpre) {
    // the scores' max, folded in by the score kernels (no mask)
    vf m = *mpre;
    m = m == splat(-INFINITY) ? vf{} : m;
    vf sum = vf{};
    for (int j = 0; j < n; ++j) {
      vf p = vexp(load(s + j * VW) - m);
      sum += p;
      store(s + j * VW, p);
    }
    *mo = m;
    return sum;
  }
  if (lohi) {
    // a border block: slot x of lane l is in its window when lo[l] <= x < hi[l]
    const vi lo = loadiu(lohi), hi = loadiu(lohi + VW);
    for (int r = 0; r < nrows; ++r)
      for (int x = 0; x < nx; ++x) {
        float* sp = s + (static_cast<int64_t>(r) * nx + x) * VW;
        const vi xv = vi{} + x;
        store(sp, ((xv >= lo) & (xv < hi)) ? load(sp) : splat(-INFINITY));
      }
  }
  vf m = splat(-INFINITY);
  for (int j = 0; j < n; ++j) {
    vf v = load(s + j * VW);
    m = v > m ? v : m;
  }
  // only NaN (or -inf) scores: let them through exp, as the tile path does
  m = m == splat(-INFINITY) ? vf{} : m;
  vf sum = vf{};
  for (int j = 0; j < n; ++j) {
    vf p = vexp(load(s + j * VW) - m);
    sum += p;
    store(s + j * VW, p);
  }
  *mo = m;
  return sum;
}

inline void lane_lse(vf m, vf sum, float* lse) {
  // a lane's sum is >= 1 (its max contributes exp(0)) unless it is NaN or the lane is unused (0);
  // one vector log instead of vw calls of std::log (which was ~5% of exact_fwd at K = 7)
  const vi normal = (sum >= 1.f) & (sum < INFINITY);
  bool all = true;
  for (int l = 0; l < VW; ++l) all = all && normal[l];
  if (all) {
    store(lse, m + vlog(sum));
  } else {
    for (int l = 0; l < VW; ++l) lse[l] = m[l] + std::log(sum[l]);
  }
}

// kernels.h
void row_sums(const float* x, int64_t ldr, int64_t lds, int nrows, int nd, int nv, float* const* acc) {
  for (int r = 0; r < nrows; ++r)
    for (int d = 0; d < nd; ++d) {
      const float* p = x + r * ldr + d * lds;
      vf a = load(acc[r * nd + d]);
      for (int v = 0; v < nv; ++v) a += load(p + v * VW);
      store(acc[r * nd + d], a);
    }
}

// rpb's bias (kernels.h, exact_fwd): slot x of key row r of scores s [nrows][nx][VW] += brow[r][x] on every lane
// (brow null: no bias)
inline void add_bias(float* s, int nrows, int nx, const float* const* brow) {
  for (int r = 0; brow && r < nrows; ++r) {
    const float* b = brow[r];
    float* sr = s + static_cast<int64_t>(r) * nx * VW;
    for (int x = 0; x < nx; ++x) store(sr + x * VW, load(sr + x * VW) + splat(b[x]));
  }
}

void exact_fwd(const float* qT, int64_t ldq, float scale, int64_t D, const float* kT, int64_t ldk, const float* vT,
               int64_t ldv, int64_t Dv, const int64_t* rowbase, int nrows, int nx, const int* lohi, float* s, float* oT,
               float* lse, const float* const* bias) {
  const int n = nrows * nx;
  if (scale != 1.f) {
    // the queries scaled once into the scratch after the scores, not once per key row below
    float* qs = s + static_cast<int64_t>(n) * VW;
    for (int64_t d = 0; d < D; ++d) store(qs + d * VW, load(qT + d * ldq) * scale);
    qT = qs;
    ldq = VW;
    scale = 1.f;
  }
  for (int r = 0; r < nrows; ++r)
    for (int x0 = 0; x0 < nx; x0 += 8)
      scores_chunk1(nx - x0 < 8 ? nx - x0 : 8, qT, ldq, D, kT + rowbase[r] + x0, ldk,
                    s + (static_cast<int64_t>(r) * nx + x0) * VW);
  add_bias(s, nrows, nx, bias);
  vf m;
  const vf sum = lane_softmax(s, nrows, nx, lohi, &m);
  slot_sums(s, vT, ldv, Dv, rowbase, nrows, nx, 1.f / sum, oT);
  lane_lse(m, sum, lse);
}

// Two blocks of the same vw lanes along the last axis in two query rows (2D/3D: neighbours along the
// second-to-last axis), whose windows mostly cover the same key rows: a key row in both windows is
// read once per feature for both blocks, so the score and P.V loops issue ~0.75 loads per FMA instead
// of ~1.1 (one block alone is bound by the load ports, not by the FMAs). Key row bases ascend in both
// lists; fn(i, j, base) walks their union, i (j) the row's index in A (B) or -1. (The driver's rings of
// row slots wrap a list's bases once, mid-list: the walk then misses some shared rows and serves them
// twice, by fn(i, -1) and fn(-1, j), each list still in its own order: the same arithmetic, bitwise.)
template <class F>
__attribute__((always_inline)) inline void for_union(const int64_t* ra, int na, const int64_t* rbb, int nb, F&& fn) {
  int i = 0, j = 0;
  while (i < na || j < nb) {
    if (j >= nb || (i < na && ra[i] < rbb[j])) {
      fn(i, -1, ra[i]);
      ++i;
    } else if (i >= na || rbb[j] < ra[i]) {
      fn(-1, j, rbb[j]);
      ++j;
    } else {
      fn(i, j, ra[i]);
      ++i;
      ++j;
    }
  }
}

#if defined(NA_VARIANT_avx512) && !defined(NA_NO_ALIGNR)
// Keys kr[x .. x + 15] for x < NX from two loads: lo = kr[0 .. 15] and hi = kr[16 .. NX + 14] (a masked
// load: nothing past the chunk's last key is read), lanes x.. of lo then lanes ..x-1 of hi (valignd).
// A 64-byte load at a shifted key row crosses a cache line at 15 of 16 offsets (two accesses on the
// load ports); NX shifted loads become two and NX - 1 shuffles.
template <int X>
__attribute__((always_inline)) inline vf shifted_keys(vf lo, vf hi) {
  if constexpr (X == 0)
    return lo;
  else
    return vf(_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(__m512(hi)), _mm512_castps_si512(__m512(lo)), X)));
}
// hi of a row at p: its keys 16 .. NX + 14, zero past them (a masked load; nothing beyond is read)
template <int NX>
__attribute__((always_inline)) inline vf hi_part(const float* p) {
  return NX > 1 ? vf(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (NX - 1)) - 1), p + VW)) : vf{};
}
template <int NX, int... X>
__attribute__((always_inline)) inline void scores_step2(std::integer_sequence<int, X...>, vf qav, vf qbv, const float* kr, vf* a, vf* b) {
  vf lo = load(kr);
  vf hi = hi_part<NX>(kr);
  asm("" : "+v"(lo), "+v"(hi));
  ((a[X] += qav * shifted_keys<X>(lo, hi), b[X] += qbv * shifted_keys<X>(lo, hi)), ...);
}
#define NA_ALIGNR_RUN2 1
#endif

// scores of slots x < NX of one key row for both blocks (queries already scaled)
template <int NX>
inline void exact_scores_run2(const float* qa, const float* qb, int64_t ldq, int64_t D, const float* kb, int64_t ldk,
                              float* sa, float* sb, vf* ma = nullptr, vf* mb = nullptr) {
  vf a[NX], b[NX];
#pragma GCC unroll 8
  for (int x = 0; x < NX; ++x) a[x] = b[x] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    const vf qav = load(qa + d * ldq), qbv = load(qb + d * ldq);
    const float* kr = kb + d * ldk;
#if defined(NA_ALIGNR_RUN2)
    if constexpr (NX >= NA_ALIGNR_MIN) {
      scores_step2<NX>(std::make_integer_sequence<int, NX>{}, qav, qbv, kr, a, b);
      continue;
    }
#endif
#pragma GCC unroll 8
    for (int x = 0; x < NX; ++x) {
      const vf k = load_reg(kr + x);
      a[x] += qav * k;
      b[x] += qbv * k;
    }
  }
#pragma GCC unroll 8
  for (int x = 0; x < NX; ++x) {
    store(sa + x * VW, a[x]);
    store(sb + x * VW, b[x]);
  }
  fold_max<NX>(a, ma);
  fold_max<NX>(b, mb);
}

// Widest chunks of the pair kernels: slots per score chunk (two accumulators each, plus two queries and
// a key in registers) and features per P.V / dS.K pass (two accumulators each, plus two weights and a
// value): 16 vector registers (AVX2, NEON) hold 5 slots / 4 features, AVX-512's 32 hold 8 / 8, which
// loads each query (weight) vector once per 8 slots (features) instead of 5 (4)
#if defined(NA_VARIANT_avx512)
constexpr int PAIR_SLOTS = 8, PAIR_FEATURES = 8;
#else
constexpr int PAIR_SLOTS = 5, PAIR_FEATURES = 4;
#endif
// slots [x0, x0 + n) of one key row, n <= PAIR_SLOTS
inline void scores_chunk2(int n, const float* qa, const float* qb, int64_t ldq, int64_t D, const float* kb,
                          int64_t ldk, float* sa, float* sb, vf* ma = nullptr, vf* mb = nullptr) {
  switch (n) {
#define NA_CASE(X) \
  case X: exact_scores_run2<X>(qa, qb, ldq, D, kb, ldk, sa, sb, ma, mb); break;
    NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5)
#if defined(NA_VARIANT_avx512)
    NA_CASE(6) NA_CASE(7) NA_CASE(8)
#endif
#undef NA_CASE
    default: break;
  }
}
// slot_sum of C features for both blocks over the union of their key rows: wa/wb their weights
template <int C>
inline void slot_sum2(const float* wa, const float* wb, const float* src, int64_t ld, const int64_t* ra, int na,
                      const int64_t* rbb, int nb, int nx, vf* oa, vf* ob) {
  vf a[C], b[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) a[c] = b[c] = vf{};
  for_union(ra, na, rbb, nb, [&](int i, int j, int64_t base) {
    const float* s0 = src + base;
    if (i >= 0 && j >= 0) {
      const float* pa = wa + static_cast<int64_t>(i) * nx * VW;
      const float* pb = wb + static_cast<int64_t>(j) * nx * VW;
      for (int x = 0; x < nx; ++x) {
        const vf p = load(pa + x * VW), q = load(pb + x * VW);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          const vf v = load_reg(s0 + c * ld + x);
          a[c] += p * v;
          b[c] += q * v;
        }
      }
    } else {
      const float* pw = i >= 0 ? wa + static_cast<int64_t>(i) * nx * VW : wb + static_cast<int64_t>(j) * nx * VW;
      vf* acc = i >= 0 ? a : b;
      for (int x = 0; x < nx; ++x) {
        const vf p = load(pw + x * VW);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[c] += p * load(s0 + c * ld + x);
      }
    }
  });
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    oa[c] = a[c];
    ob[c] = b[c];
  }
}

#if defined(NA_ALIGNR_RUN2)
// slot_sum2 of C features with the value rows' shifted loads made as in scores_step2: per key row and
// feature two loads (lo, hi) and NX - 1 valignd instead of NX loads that cross a cache line; the sums
// run in slot_sum2's order (rows of the union, then slots), so the results are bitwise the same
// per feature c of a key/value row at s0 (features ld apart): the two loads the shifted slots are cut from
template <int C, int NX>
__attribute__((always_inline)) inline void lo_hi_rows(const float* s0, int64_t ld, vf* lo, vf* hi) {
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    lo[c] = load(s0 + c * ld);
    hi[c] = hi_part<NX>(s0 + c * ld);
  }
}
template <int C, int NX, int... X>
__attribute__((always_inline)) inline void pv_row2(std::integer_sequence<int, X...>, const float* pa, const float* pb, const float* s0, int64_t ld,
                    vf* a, vf* b) {
  vf lo[C], hi[C];
  lo_hi_rows<C, NX>(s0, ld, lo, hi);
  auto step = [&](auto xc) __attribute__((always_inline)) {
    constexpr int x = decltype(xc)::value;
    const vf p = load(pa + x * VW), q = load(pb + x * VW);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const vf v = shifted_keys<x>(lo[c], hi[c]);
      a[c] += p * v;
      b[c] += q * v;
    }
  };
  (step(std::integral_constant<int, X>{}), ...);
}
template <int C, int NX, int... X>
__attribute__((always_inline)) inline void pv_row1(std::integer_sequence<int, X...>, const float* pw, const float* s0, int64_t ld, vf* acc) {
  vf lo[C], hi[C];
  lo_hi_rows<C, NX>(s0, ld, lo, hi);
  auto step = [&](auto xc) __attribute__((always_inline)) {
    constexpr int x = decltype(xc)::value;
    const vf p = load(pw + x * VW);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[c] += p * shifted_keys<x>(lo[c], hi[c]);
  };
  (step(std::integral_constant<int, X>{}), ...);
}
// pv_row2 / pv_row1 feature by feature: per feature its two loads, then its NX shifted FMAs (the weights
// read from memory by the FMAs), so C = 8 features hold 16 accumulators and a row's lo / hi / shifted
// value at a time; each feature's sum runs over the same (row, slot) order as pv_row2's, bitwise the same
template <int C, int NX, int... X>
__attribute__((always_inline)) inline void pv_row2f(std::integer_sequence<int, X...>, const float* pa, const float* pb, const float* s0,
                                                    int64_t ld, vf* a, vf* b) {
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    const vf lo = load(s0 + c * ld), hi = hi_part<NX>(s0 + c * ld);
    auto step = [&](auto xc) __attribute__((always_inline)) {
      constexpr int x = decltype(xc)::value;
      const vf v = shifted_keys<x>(lo, hi);
      a[c] += load(pa + x * VW) * v;
      b[c] += load(pb + x * VW) * v;
    };
    (step(std::integral_constant<int, X>{}), ...);
  }
}
template <int C, int NX, int... X>
__attribute__((always_inline)) inline void pv_row1f(std::integer_sequence<int, X...>, const float* pw, const float* s0, int64_t ld,
                                                    vf* acc) {
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    const vf lo = load(s0 + c * ld), hi = hi_part<NX>(s0 + c * ld);
    auto step = [&](auto xc) __attribute__((always_inline)) {
      constexpr int x = decltype(xc)::value;
      acc[c] += load(pw + x * VW) * shifted_keys<x>(lo, hi);
    };
    (step(std::integral_constant<int, X>{}), ...);
  }
}
// F: the rows feature by feature (pv_row2f / pv_row1f), else G features interleaved (pv_row2 / pv_row1)
template <int C, int NX, bool F = false>
__attribute__((always_inline)) inline void slot_sum2s(const float* wa, const float* wb, const float* src, int64_t ld, const int64_t* ra, int na,
                       const int64_t* rbb, int nb, vf* oa, vf* ob) {
  vf a[C], b[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) a[c] = b[c] = vf{};
  for_union(ra, na, rbb, nb, [&](int i, int j, int64_t base) __attribute__((always_inline)) {
    const float* s0 = src + base;
    if (i >= 0 && j >= 0) {
      const float* pa = wa + static_cast<int64_t>(i) * NX * VW;
      const float* pb = wb + static_cast<int64_t>(j) * NX * VW;
      if constexpr (F)
        pv_row2f<C, NX>(std::make_integer_sequence<int, NX>{}, pa, pb, s0, ld, a, b);
      else
        pv_row2<C, NX>(std::make_integer_sequence<int, NX>{}, pa, pb, s0, ld, a, b);
    } else {
      const float* pw = i >= 0 ? wa + static_cast<int64_t>(i) * NX * VW : wb + static_cast<int64_t>(j) * NX * VW;
      if constexpr (F)
        pv_row1f<C, NX>(std::make_integer_sequence<int, NX>{}, pw, s0, ld, i >= 0 ? a : b);
      else
        pv_row1<C, NX>(std::make_integer_sequence<int, NX>{}, pw, s0, ld, i >= 0 ? a : b);
    }
  });
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    oa[c] = a[c];
    ob[c] = b[c];
  }
}
template <int NX>
inline void slot_sums2s(const float* wa, const float* wb, const float* src, int64_t ld, int64_t W, const int64_t* ra,
                        int na, const int64_t* rbb, int nb, vf mula, vf mulb, float* oa, float* ob) {
  constexpr int G = NA_ALIGNR_PV;
  int64_t c = 0;
  vf xa[G > 8 ? G : 8], xb[G > 8 ? G : 8];
  // at <= 8 slots: 8 features per pass, one feature at a time (16 accumulators; the slots' weights
  // come from memory with the FMAs, which issue one per cycle, beside the loads and valignd)
  if constexpr (NX <= 8) {
    for (; c + 8 <= W; c += 8) {
      slot_sum2s<8, NX, true>(wa, wb, src + c * ld, ld, ra, na, rbb, nb, xa, xb);
      for (int i = 0; i < 8; ++i) {
        store(oa + (c + i) * VW, xa[i] * mula);
        store(ob + (c + i) * VW, xb[i] * mulb);
      }
    }
  }
  for (; c + G <= W; c += G) {
    slot_sum2s<G, NX>(wa, wb, src + c * ld, ld, ra, na, rbb, nb, xa, xb);
    for (int i = 0; i < G; ++i) {
      store(oa + (c + i) * VW, xa[i] * mula);
      store(ob + (c + i) * VW, xb[i] * mulb);
    }
  }
  for (; c < W; ++c) {
    slot_sum2s<1, NX>(wa, wb, src + c * ld, ld, ra, na, rbb, nb, xa, xb);
    store(oa + c * VW, xa[0] * mula);
    store(ob + c * VW, xb[0] * mulb);
  }
}
#endif

// slot_sums of both blocks: oa / ob [W][vw] = their slot_sum2 times mula / mulb, PAIR_FEATURES features
// at a time, then 4, then single ones
inline void slot_sums2(const float* wa, const float* wb, const float* src, int64_t ld, int64_t W, const int64_t* ra,
                       int na, const int64_t* rbb, int nb, int nx, vf mula, vf mulb, float* oa, float* ob) {
#if defined(NA_ALIGNR_RUN2) && NA_ALIGNR_PV > 0
  switch (nx) {
#define NA_CASE(X) \
  case X: slot_sums2s<X>(wa, wb, src, ld, W, ra, na, rbb, nb, mula, mulb, oa, ob); return;
    NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8) NA_CASE(9) NA_CASE(10)
    NA_CASE(11) NA_CASE(12) NA_CASE(13) NA_CASE(14) NA_CASE(15) NA_CASE(16)
#undef NA_CASE
    default: break;
  }
#endif
  int64_t c = 0;
  vf xa[PAIR_FEATURES], xb[PAIR_FEATURES];
  for (; PAIR_FEATURES > 4 && c + PAIR_FEATURES <= W; c += PAIR_FEATURES) {
    slot_sum2<PAIR_FEATURES>(wa, wb, src + c * ld, ld, ra, na, rbb, nb, nx, xa, xb);
    for (int i = 0; i < PAIR_FEATURES; ++i) {
      store(oa + (c + i) * VW, xa[i] * mula);
      store(ob + (c + i) * VW, xb[i] * mulb);
    }
  }
  for (; c + 4 <= W; c += 4) {
    slot_sum2<4>(wa, wb, src + c * ld, ld, ra, na, rbb, nb, nx, xa, xb);
    for (int i = 0; i < 4; ++i) {
      store(oa + (c + i) * VW, xa[i] * mula);
      store(ob + (c + i) * VW, xb[i] * mulb);
    }
  }
  for (; c < W; ++c) {
    slot_sum2<1>(wa, wb, src + c * ld, ld, ra, na, rbb, nb, nx, xa, xb);
    store(oa + c * VW, xa[0] * mula);
    store(ob + c * VW, xb[0] * mulb);
  }
}

#if defined(NA_ALIGNR_RUN2)
// Border blocks by lane (AVX-512): a border block's lanes hold windows that do not all start one key
// apart, so on the slots of the runs (key base + x + l for lane l) lane l's keys are slots lo[l] ..
// hi[l] - 1 of nx (C2/C4 at K = 7: 7 keys of 10 slots; 3 slots of 10 computed for nothing, and the
// border blocks were 24% / 47% of C2 / C4's forward). Here slot x' of lane l is key base + p[l] + x'
// with p[l] = l + lo[l]: each key row's keys base .. base + 31 come from the two loads of the runs
// (lo, and hi masked to what the old slots read) and slot x' is vpermt2ps(lo, p + x', hi), so a block
// computes max(hi - lo) slots. Lane l's sums see the same keys in the same order as on the old
// slots (less the masked ones, whose weights were exact zeros), so its outputs are bitwise the same.
struct LanePerm {
  int n;           // slots per lane: the widest window
  __mmask16 hm;    // lanes of the high load (keys 16 ..)
  bool mask;       // some lane holds fewer than n keys (or none: another block serves it)
  alignas(64) int p[VW];    // lane l's first key, relative to the block's key row base
  alignas(64) int lohi[2 * VW];  // lane l holds slots 0 .. hi[l] - 1 (lo = 0)
  int nd;                        // the backward's P / dS on the old slots: old slot x of the lanes
  int dv[VW];                    // dm[i] (served, lo = dv[i]) is slot x - dv[i] here
  __mmask16 dm[VW];
  // perm_scores2a's keys (al: usable, the served lanes' first keys at most 15 apart): a key row's
  // keys pmin .. pmin + 31 from two masked loads (nothing past key lim, as the old slots' loads),
  // slot x of lane l is lane idx[l] of their valignd by x (idx = p - pmin; 0 for lanes not served)
  bool al;
  int pmin, lim;
  alignas(64) int idx[VW];
};
// false where the old slots are as cheap (a lane's window spans all of them) or too wide
inline bool lane_perm(const int* lohi, int nx, LanePerm* lp) {
  int n = 0;
  for (int l = 0; l < VW; ++l) n = std::max(n, lohi[VW + l] - lohi[l]);
  if (n < 2 || n >= nx || n > 16) return false;
  int top = 0;
  lp->mask = false;
  lp->nd = 0;
  for (int l = 0; l < VW; ++l) {
    const bool served = lohi[l] < lohi[VW + l];
    if (served) {
      int i = 0;
      while (i < lp->nd && lp->dv[i] != lohi[l]) ++i;
      if (i == lp->nd) {
        lp->dv[lp->nd++] = lohi[l];
        lp->dm[i] = 0;
      }
      lp->dm[i] = static_cast<__mmask16>(lp->dm[i] | (1u << l));
    }
    lp->p[l] = served ? l + lohi[l] : 0;
    lp->lohi[l] = 0;
    lp->lohi[VW + l] = served ? lohi[VW + l] - lohi[l] : 0;
    lp->mask = lp->mask || lp->lohi[VW + l] != n;
    top = std::max(top, lp->p[l] + n - 1);
  }
  if (top > 31) return false;
  // the old slots read keys up to nx + 14 of a row (hi_part<nx>): never more here
  top = std::min(top, nx + 14);
  lp->hm = top >= VW ? static_cast<__mmask16>((1u << (top - VW + 1)) - 1) : 0;
  lp->n = n;
  int pmin = 32, pmax = 0;
  for (int l = 0; l < VW; ++l)
    if (lohi[l] < lohi[VW + l]) {
      pmin = std::min(pmin, lp->p[l]);
      pmax = std::max(pmax, lp->p[l]);
    }
  lp->al = perm_al && pmin <= pmax && pmax - pmin <= VW - 1;
  lp->pmin = lp->al ? pmin : 0;
  lp->lim = std::max(top, VW - 1);
  for (int l = 0; l < VW; ++l) lp->idx[l] = lp->al && lohi[l] < lohi[VW + l] ? lp->p[l] - pmin : 0;
  return true;
}
__attribute__((always_inline)) inline vf lane_keys(vf lo, vi idx, vf hi) {
  return vf(_mm512_permutex2var_ps(__m512(lo), __m512i(idx), __m512(hi)));
}
__attribute__((always_inline)) inline vf hi_masked(const float* p, __mmask16 hm) {
  return vf(_mm512_maskz_loadu_ps(hm, p + VW));
}
// scores of slots p + x, x < NX, of one key row for both blocks (p: lane_perm's, plus the chunk's first slot)
template <int NX>
inline void perm_scores2(const float* qa, const float* qb, int64_t ldq, int64_t D, const float* kb, int64_t ldk,
                         vi p, __mmask16 hm, float* sa, float* sb, vf* ma, vf* mb) {
  vf a[NX], b[NX];
  vi ix[NX];
#pragma GCC unroll 16
  for (int x = 0; x < NX; ++x) {
    a[x] = b[x] = vf{};
    ix[x] = p + x;
  }
  for (int64_t d = 0; d < D; ++d) {
    const vf qav = load(qa + d * ldq), qbv = load(qb + d * ldq);
    const float* kr = kb + d * ldk;
    const vf lo = load(kr), hi = hi_masked(kr, hm);
#pragma GCC unroll 16
    for (int x = 0; x < NX; ++x) {
      const vf k = lane_keys(lo, ix[x], hi);
      a[x] += qav * k;
      b[x] += qbv * k;
    }
  }
#pragma GCC unroll 16
  for (int x = 0; x < NX; ++x) {
    store(sa + x * VW, a[x]);
    store(sb + x * VW, b[x]);
  }
  fold_max<NX>(a, ma);
  fold_max<NX>(b, mb);
}
// perm_scores2 with the keys of lane_perm's al: per feature two masked loads at the row's key off =
// pmin + the chunk's first slot (lm / hm: their lanes up to key lim), then per slot x a valignd by x
// and a vpermps by idx (one source; both issue beside the FMAs on Zen 4, where vpermt2ps competes
// with them). Slot x of lane l is key off + x + idx[l] = p[l] + the chunk's first slot + x, the key
// (or the zero past lim) perm_scores2 reads there: same products, same order, bitwise the same.
inline __mmask16 lanes_upto(int cnt) {
  return cnt <= 0 ? 0 : cnt >= VW ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << cnt) - 1);
}
template <int NX, int... X>
inline void perm_scores2a(std::integer_sequence<int, X...>, const float* qa, const float* qb, int64_t ldq, int64_t D,
                          const float* kb, int64_t ldk, vi idx, __mmask16 lm, __mmask16 hm, float* sa, float* sb, vf* ma,
                          vf* mb) {
  vf a[NX], b[NX];
#pragma GCC unroll 16
  for (int x = 0; x < NX; ++x) a[x] = b[x] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    const vf qav = load(qa + d * ldq), qbv = load(qb + d * ldq);
    const float* kr = kb + d * ldk;
    const vf lo = vf(_mm512_maskz_loadu_ps(lm, kr)), hi = hi_masked(kr, hm);
    auto step = [&](auto xc) __attribute__((always_inline)) {
      constexpr int x = decltype(xc)::value;
      const vf k = vf(_mm512_permutexvar_ps(__m512i(idx), __m512(shifted_keys<x>(lo, hi))));
      a[x] += qav * k;
      b[x] += qbv * k;
    };
    (step(std::integral_constant<int, X>{}), ...);
  }
#pragma GCC unroll 16
  for (int x = 0; x < NX; ++x) {
    store(sa + x * VW, a[x]);
    store(sb + x * VW, b[x]);
  }
  fold_max<NX>(a, ma);
  fold_max<NX>(b, mb);
}
// perm_scores1 as perm_scores2a (lp.al): bitwise the same
template <int NX, int... X>
inline void perm_scores1a(std::integer_sequence<int, X...>, const float* q, int64_t ldq, int64_t D, const float* kb,
                          int64_t ldk, vi idx, __mmask16 lm, __mmask16 hm, float* s, vf* mx) {
  vf a[NX];
#pragma GCC unroll 16
  for (int x = 0; x < NX; ++x) a[x] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    const vf qv = load(q + d * ldq);
    const float* kr = kb + d * ldk;
    const vf lo = vf(_mm512_maskz_loadu_ps(lm, kr)), hi = hi_masked(kr, hm);
    auto step = [&](auto xc) __attribute__((always_inline)) {
      constexpr int x = decltype(xc)::value;
      a[x] += qv * vf(_mm512_permutexvar_ps(__m512i(idx), __m512(shifted_keys<x>(lo, hi))));
    };
    (step(std::integral_constant<int, X>{}), ...);
  }
#pragma GCC unroll 16
  for (int x = 0; x < NX; ++x) store(s + x * VW, a[x]);
  fold_max<NX>(a, mx);
}
template <int NX>
inline void perm_scores1(const float* q, int64_t ldq, int64_t D, const float* kb, int64_t ldk, vi p, __mmask16 hm,
                         float* s, vf* mx) {
  vf a[NX];
  vi ix[NX];
#pragma GCC unroll 16
  for (int x = 0; x < NX; ++x) {
    a[x] = vf{};
    ix[x] = p + x;
  }
  for (int64_t d = 0; d < D; ++d) {
    const vf qv = load(q + d * ldq);
    const float* kr = kb + d * ldk;
    const vf lo = load(kr), hi = hi_masked(kr, hm);
#pragma GCC unroll 16
    for (int x = 0; x < NX; ++x) a[x] += qv * lane_keys(lo, ix[x], hi);
  }
#pragma GCC unroll 16
  for (int x = 0; x < NX; ++x) store(s + x * VW, a[x]);
  fold_max<NX>(a, mx);
}
// perm_chunk2 of slots x0 .. x0 + n - 1 of lane_perm lp's: perm_scores2a where lp.al, else perm_scores2
inline void perm_chunk2(int n, const float* qa, const float* qb, int64_t ldq, int64_t D, const float* kb, int64_t ldk,
                        vi p, __mmask16 hm, float* sa, float* sb, vf* ma, vf* mb, const LanePerm& lp, int x0) {
  if (lp.al) {
    const int off = lp.pmin + x0;
    const __mmask16 lm = lanes_upto(lp.lim - off + 1), hm2 = lanes_upto(lp.lim - off - VW + 1);
    const vi idx = *reinterpret_cast<const vi*>(lp.idx);
    switch (n) {
#define NA_CASE(X)                                                                                                    \
  case X:                                                                                                             \
    perm_scores2a<X>(std::make_integer_sequence<int, X>{}, qa, qb, ldq, D, kb + off, ldk, idx, lm, hm2, sa, sb, ma, \
                     mb);                                                                                             \
    return;
      NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
      default: return;
    }
  }
  p += x0;
  switch (n) {
#define NA_CASE(X) \
  case X: perm_scores2<X>(qa, qb, ldq, D, kb, ldk, p, hm, sa, sb, ma, mb); break;
    NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
    default: break;
  }
}
inline void perm_chunk1(int n, const float* q, int64_t ldq, int64_t D, const float* kb, int64_t ldk, vi p,
                        __mmask16 hm, float* s, vf* mx, const LanePerm& lp, int x0) {
  if (lp.al) {
    const int off = lp.pmin + x0;
    const __mmask16 lm = lanes_upto(lp.lim - off + 1), hm2 = lanes_upto(lp.lim - off - VW + 1);
    const vi idx = *reinterpret_cast<const vi*>(lp.idx);
    switch (n) {
#define NA_CASE(X) \
  case X: perm_scores1a<X>(std::make_integer_sequence<int, X>{}, q, ldq, D, kb + off, ldk, idx, lm, hm2, s, mx); return;
      NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
      default: return;
    }
  }
  p += x0;
  switch (n) {
#define NA_CASE(X) \
  case X: perm_scores1<X>(q, ldq, D, kb, ldk, p, hm, s, mx); break;
    NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
    default: break;
  }
}
// slot_sum2s on lane_perm's slots: per key row of the union and feature the two loads, then the
// slots in order (the rows of the union, then the slots, as slot_sum2s)
template <int C, int NX>
__attribute__((always_inline)) inline void perm_sum2(const float* wa, const float* wb, const float* src, int64_t ld,
                                                     const int64_t* ra, int na, const int64_t* rbb, int nb,
                                                     const vi* ix, __mmask16 hm, vf* oa, vf* ob) {
  vf a[C], b[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) a[c] = b[c] = vf{};
  for_union(ra, na, rbb, nb, [&](int i, int j, int64_t base) __attribute__((always_inline)) {
    const float* s0 = src + base;
    vf lo[C], hi[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      lo[c] = load(s0 + c * ld);
      hi[c] = hi_masked(s0 + c * ld, hm);
    }
    if (i >= 0 && j >= 0) {
      const float* pa = wa + static_cast<int64_t>(i) * NX * VW;
      const float* pb = wb + static_cast<int64_t>(j) * NX * VW;
#pragma GCC unroll 16
      for (int x = 0; x < NX; ++x) {
        const vf p = load(pa + x * VW), q = load(pb + x * VW);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          const vf v = lane_keys(lo[c], ix[x], hi[c]);
          a[c] += p * v;
          b[c] += q * v;
        }
      }
    } else {
      const float* pw = i >= 0 ? wa + static_cast<int64_t>(i) * NX * VW : wb + static_cast<int64_t>(j) * NX * VW;
      vf* acc = i >= 0 ? a : b;
#pragma GCC unroll 16
      for (int x = 0; x < NX; ++x) {
        const vf p = load(pw + x * VW);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[c] += p * lane_keys(lo[c], ix[x], hi[c]);
      }
    }
  });
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    oa[c] = a[c];
    ob[c] = b[c];
  }
}
template <int NX>
inline void perm_sums2s(const float* wa, const float* wb, const float* src, int64_t ld, int64_t W, const int64_t* ra,
                        int na, const int64_t* rbb, int nb, const LanePerm& lp, vf mula, vf mulb, float* oa,
                        float* ob) {
  constexpr int G = NA_ALIGNR_PV > 0 ? NA_ALIGNR_PV : 4;
  alignas(64) vi ix[NX];
  const vi p = *reinterpret_cast<const vi*>(lp.p);
  for (int x = 0; x < NX; ++x) ix[x] = p + x;
  int64_t c = 0;
  vf xa[G], xb[G];
  for (; c + G <= W; c += G) {
    perm_sum2<G, NX>(wa, wb, src + c * ld, ld, ra, na, rbb, nb, ix, lp.hm, xa, xb);
    for (int i = 0; i < G; ++i) {
      store(oa + (c + i) * VW, xa[i] * mula);
      store(ob + (c + i) * VW, xb[i] * mulb);
    }
  }
  for (; c < W; ++c) {
    perm_sum2<1, NX>(wa, wb, src + c * ld, ld, ra, na, rbb, nb, ix, lp.hm, xa, xb);
    store(oa + c * VW, xa[0] * mula);
    store(ob + c * VW, xb[0] * mulb);
  }
}

// ---- P.V from value rows (exact_fwd2r): a key's Dv features contiguous (the driver's copies of MLX's
// heads-last rows) instead of transposed values, outputs written as rows. Lane l of a block holds the slots s
// of its window that the score layout gives it, slot s being key kb[l] + s (relative to the block's window
// start), weights P[(i * ns + s) * VW + l] for key row i. Lanes whose keys slide by one per lane form a band
// (each key's value row loaded once for all the band's lanes whose windows hold it); lanes with the same
// window (clamped at a border) a group sharing every value row; any other lane goes alone. Each lane's sums
// run over its key rows and slots in the order of the transposed values' kernels (slot_sums2, perm_sums2s):
// bitwise the same outputs; and only a lane's own slots are multiplied (no zero weight meets a value).
__attribute__((always_inline)) inline vf mload(__mmask16 m, const float* p) { return vf(_mm512_maskz_loadu_ps(m, p)); }
__attribute__((always_inline)) inline vf bcast(const float* p) { return vf(_mm512_set1_ps(*p)); }
// band of GL lanes L0 .. L0 + GL - 1, lane l's slot x being key off + l + x, F feature vectors from c0; keys
// outside [lo, hi) are not read (only lanes outside the band can reach them; their sums are not stored)
template <int NX, int GL, int F, bool MASK>
__attribute__((noinline)) void pv_band(const float* P, const float* const* vr, int nrows, int64_t vs, int64_t off, int L0,
                                       int64_t c0, int lo, int hi, vf (*acc)[2]) {
  __mmask16 jm[NX + GL - 1];
  for (int j = 0; j < NX + GL - 1; ++j) {
    const int64_t key = off + L0 + j;
    jm[j] = !MASK || (key >= lo && key < hi) ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>(0);
  }
  vf a0[GL], a1[GL];
#pragma GCC unroll 8
  for (int l = 0; l < GL; ++l) a0[l] = a1[l] = vf{};
  for (int i = 0; i < nrows; ++i) {
    const float* pr = P + static_cast<int64_t>(i) * NX * VW + L0;
    const float* v = vr[i] + (off + L0) * vs + c0;
#pragma GCC unroll 32
    for (int j = 0; j < NX + GL - 1; ++j) {
      const vf v0 = MASK ? mload(jm[j], v + j * vs) : load(v + j * vs);
      const vf v1 = F > 1 ? (MASK ? mload(jm[j], v + j * vs + VW) : load(v + j * vs + VW)) : vf{};
#pragma GCC unroll 8
      for (int l = 0; l < GL; ++l) {
        const int x = j - l;
        if (x < 0 || x >= NX) continue;
        const vf w = bcast(pr + x * VW + l);
        a0[l] += w * v0;
        if (F > 1) a1[l] += w * v1;
      }
    }
  }
#pragma GCC unroll 8
  for (int l = 0; l < GL; ++l) {
    acc[l][0] = a0[l];
    acc[l][1] = a1[l];
  }
}
// M lanes (lanes[m]) whose slot s is key off + s, s < ns, every one in their windows
template <int M, int F>
__attribute__((noinline)) void pv_group(const float* P, int ns, const int* lanes, const float* const* vr, int nrows,
                                        int64_t vs, int64_t off, int64_t c0, vf (*acc)[2]) {
  vf a0[M], a1[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = vf{};
  for (int i = 0; i < nrows; ++i) {
    const float* pr = P + static_cast<int64_t>(i) * ns * VW;
    const float* v = vr[i] + off * vs + c0;
    for (int s = 0; s < ns; ++s) {
      const vf v0 = load(v + s * vs), v1 = F > 1 ? load(v + s * vs + VW) : vf{};
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const vf w = bcast(pr + s * VW + lanes[m]);
        a0[m] += w * v0;
        if (F > 1) a1[m] += w * v1;
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    acc[m][0] = a0[m];
    acc[m][1] = a1[m];
  }
}
// one lane, slots [s0, s1), slot s being key off + s
template <int F>
inline void pv_lane(const float* P, int ns, int l, int s0, int s1, const float* const* vr, int nrows, int64_t vs,
                    int64_t off, int64_t c0, vf* acc) {
  vf a0 = vf{}, a1 = vf{};
  for (int i = 0; i < nrows; ++i) {
    const float* pr = P + static_cast<int64_t>(i) * ns * VW + l;
    const float* v = vr[i] + off * vs + c0;
    for (int s = s0; s < s1; ++s) {
      const vf w = bcast(pr + s * VW);
      a0 += w * load(v + s * vs);
      if (F > 1) a1 += w * load(v + s * vs + VW);
    }
  }
  acc[0] = a0;
  acc[1] = a1;
}
template <int GL, int F>
inline void pv_band_n(int ns, const float* P, const float* const* vr, int nrows, int64_t vs, int64_t off, int L0,
                      int64_t c0, int lo, int hi, vf (*acc)[2]) {
  // keys outside [lo, hi) only where the band's reach crosses them (border blocks)
  const bool mask = off + L0 < lo || off + L0 + ns + GL - 1 > hi;
  switch (ns) {
#define NA_CASE(X)                                                                   \
  case X:                                                                            \
    if (mask)                                                                        \
      pv_band<X, GL, F, true>(P, vr, nrows, vs, off, L0, c0, lo, hi, acc);           \
    else                                                                             \
      pv_band<X, GL, F, false>(P, vr, nrows, vs, off, L0, c0, lo, hi, acc);          \
    break;
    NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8) NA_CASE(9) NA_CASE(10)
    NA_CASE(11) NA_CASE(12) NA_CASE(13) NA_CASE(14) NA_CASE(15) NA_CASE(16)
#undef NA_CASE
    default: break;
  }
}
template <int F>
inline void pv_group_m(int m, const float* P, int ns, const int* lanes, const float* const* vr, int nrows, int64_t vs,
                       int64_t off, int64_t c0, vf (*acc)[2]) {
  switch (m) {
#define NA_CASE(M) \
  case M: pv_group<M, F>(P, ns, lanes, vr, nrows, vs, off, c0, acc); break;
    NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
    default: break;
  }
}
// The lanes of a block cut into bands, groups and single lanes (see pv_band): lane l's slots [slo[l], shi[l])
// of the score layout's ns are keys kb[l] + s; the lanes of serve only
struct PVSeg {
  int kind, l0, l1;  // 0 band, 1 group, 2 one lane; lanes [l0, l1)
};
inline int pv_segments(int ns, const int* kb, const int* slo, const int* shi, unsigned serve, PVSeg* seg) {
  auto full = [&](int l) { return (serve >> l & 1) && slo[l] == 0 && shi[l] == ns; };
  int n = 0, l = 0;
  while (l < VW) {
    if (!(serve >> l & 1) || slo[l] >= shi[l]) {
      ++l;
      continue;
    }
    int e = l + 1;
    if (full(l)) {
      while (e < VW && full(e) && kb[e] == kb[e - 1] + 1) ++e;
      if (e - l >= 2) {
        seg[n++] = {0, l, e};
        l = e;
        continue;
      }
      e = l + 1;
      while (e < VW && full(e) && kb[e] == kb[l]) ++e;
      if (e - l >= 2) {
        seg[n++] = {1, l, e};
        l = e;
        continue;
      }
    }
    seg[n++] = {2, l, l + 1};
    ++l;
  }
  return n;
}
// one block's P.V from its softmaxed scores P ([nrows][ns][VW]) over the segments: out rows o + l * os
// times mul[l]
inline void row_pv(const float* P, int ns, int nrows, const int* kb, const int* slo, const int* shi, const PVSeg* seg,
                   int nseg, const float* const* vr, int64_t vs, int lo, int hi, int64_t Dv, const float* mul, float* o,
                   int64_t os, bool nt) {
  vf acc[8][2];
  // (non-temporal: every row starts on a line when o does and os is a multiple of VW)
  nt = nt && reinterpret_cast<std::uintptr_t>(o) % 64 == 0 && os % VW == 0;
  auto put = [&](int l, int64_t c0, const vf* a, int F) {
    float* d = o + l * os + c0;
    const vf m = bcast(mul + l);
    if (nt) {
      _mm512_stream_ps(d, a[0] * m);
      if (F > 1) _mm512_stream_ps(d + VW, a[1] * m);
      return;
    }
    store(d, a[0] * m);
    if (F > 1) store(d + VW, a[1] * m);
  };
  for (int k = 0; k < nseg; ++k) {
    const int l = seg[k].l0, e = seg[k].l1;
    if (seg[k].kind == 0) {
      // a band [l, e): groups of 8 lanes (4 for the last 4 or fewer), the last one shifted back to end at e
      // where it can, or past it (the lanes past e are not stored)
      const int64_t off = kb[l] - l;
      for (int g0 = l; g0 < e;) {
        const int GL = e - g0 > 4 ? 8 : 4;
        const int L0 = std::min(g0, VW - GL);
        for (int64_t c0 = 0; c0 < Dv; c0 += 2 * VW) {
          const int F = Dv - c0 >= 2 * VW ? 2 : 1;
          if (GL == 8)
            F == 2 ? pv_band_n<8, 2>(ns, P, vr, nrows, vs, off, L0, c0, lo, hi, acc)
                   : pv_band_n<8, 1>(ns, P, vr, nrows, vs, off, L0, c0, lo, hi, acc);
          else
            F == 2 ? pv_band_n<4, 2>(ns, P, vr, nrows, vs, off, L0, c0, lo, hi, acc)
                   : pv_band_n<4, 1>(ns, P, vr, nrows, vs, off, L0, c0, lo, hi, acc);
          for (int t = g0; t < std::min(e, L0 + GL); ++t) put(t, c0, acc[t - L0], F);
        }
        g0 = std::min(e, L0 + GL);
      }
    } else if (seg[k].kind == 1) {
      // a group [l, e) of one window, 8 lanes at a time
      for (int g0 = l; g0 < e; g0 += 8) {
        const int mm = std::min(8, e - g0);
        int lanes[8];
        for (int t = 0; t < mm; ++t) lanes[t] = g0 + t;
        for (int64_t c0 = 0; c0 < Dv; c0 += 2 * VW) {
          const int F = Dv - c0 >= 2 * VW ? 2 : 1;
          F == 2 ? pv_group_m<2>(mm, P, ns, lanes, vr, nrows, vs, kb[l], c0, acc)
                 : pv_group_m<1>(mm, P, ns, lanes, vr, nrows, vs, kb[l], c0, acc);
          for (int t = 0; t < mm; ++t) put(g0 + t, c0, acc[t], F);
        }
      }
    } else {
      for (int64_t c0 = 0; c0 < Dv; c0 += 2 * VW) {
        const int F = Dv - c0 >= 2 * VW ? 2 : 1;
        F == 2 ? pv_lane<2>(P, ns, l, slo[l], shi[l], vr, nrows, vs, kb[l], c0, acc[0])
               : pv_lane<1>(P, ns, l, slo[l], shi[l], vr, nrows, vs, kb[l], c0, acc[0]);
        put(l, c0, acc[0], F);
      }
    }
  }
}
// lse of a block's lanes of serve to la + l * ls
inline void row_lse(vf m, vf sum, float* la, int64_t ls, unsigned serve) {
  alignas(64) float lse[VW];
  lane_lse(m, sum, lse);
  for (int l = 0; l < VW; ++l)
    if (serve >> l & 1) la[l * ls] = lse[l];
}
// row_pv and row_lse of both blocks of exact_fwd2r (B: when rp.ob)
inline void row_pv2(const RowPV& rp, const float* sa, const float* sb, int na, int nb, int ns, const int* kb,
                    const int* slo, const int* shi, int64_t Dv, vf suma, vf sumb, vf ma, vf mb) {
  PVSeg seg[VW];
  const int nseg = pv_segments(ns, kb, slo, shi, rp.serve, seg);
  alignas(64) float mul[2][VW];
  store(mul[0], 1.f / suma);
  store(mul[1], 1.f / sumb);
  row_pv(sa, ns, na, kb, slo, shi, seg, nseg, rp.va, rp.vs, rp.lo, rp.hi, Dv, mul[0], rp.oa, rp.os, rp.nt);
  row_lse(ma, suma, rp.la, rp.ls, rp.serve);
  if (rp.ob) {
    row_pv(sb, ns, nb, kb, slo, shi, seg, nseg, rp.vb, rp.vs, rp.lo, rp.hi, Dv, mul[1], rp.ob, rp.os, rp.nt);
    row_lse(mb, sumb, rp.lb, rp.ls, rp.serve);
  }
}
// add_bias on lane_perm's slots: slot x of lane l is old slot lo[l] + x (lo = p - l), whose bias is
// brow[r][lo[l] + x], picked from the row's old slots 0 .. 31 (masked loads: nothing past old slot nx - 1;
// lane_perm keeps p[l] + x <= 31). A lane's slots past its window (or a lane not served) get some entry
// of the row, as their scores are masked after. (brow null: no bias)
inline void add_bias_perm(float* s, int nrows, const LanePerm& lp, int nx, const float* const* brow) {
  if (!brow) return;
  const int n = lp.n;
  const vi lo = *reinterpret_cast<const vi*>(lp.p) - lanes();
  const __mmask16 m0 = lanes_upto(nx), m1 = lanes_upto(nx - VW);
  for (int r = 0; r < nrows; ++r) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, brow[r]), b1 = _mm512_maskz_loadu_ps(m1, brow[r] + VW);
    float* sr = s + static_cast<int64_t>(r) * n * VW;
    for (int x = 0; x < n; ++x)
      store(sr + x * VW, load(sr + x * VW) + vf(_mm512_permutex2var_ps(b0, __m512i(lo + x), b1)));
  }
}
// exact_fwd2 of a border block on lane_perm's slots (qs: the scaled queries, as exact_fwd2's; ba / bb: the
// blocks' bias on the old slots, nx of them)
void exact_fwd2_perm(const float* qs, int64_t D, const float* kT, int64_t ldk, const float* vT, int64_t ldv,
                     int64_t Dv, const int64_t* ra, int na, const int64_t* rbb, int nb, const LanePerm& lp, float* sa,
                     float* sb, float* oa, float* ob, float* lsea, float* lseb, int nx, const float* const* ba,
                     const float* const* bb, const RowPV* rp = nullptr) {
  const int n = lp.n;
  const vi p = *reinterpret_cast<const vi*>(lp.p);
  const int nch = (n + PAIR_SLOTS - 1) / PAIR_SLOTS;
  // the max folded into the score chunks where no slot is masked (and no bias comes after)
  vf fa = splat(-INFINITY), fb = fa;
  vf *pfa = lp.mask || ba ? nullptr : &fa, *pfb = lp.mask || ba ? nullptr : &fb;
  for_union(ra, na, rbb, nb, [&](int i, int j, int64_t base) {
    if (i < 0 || j < 0) {
      const float* q = i >= 0 ? qs : qs + VW;
      float* sr = i >= 0 ? sa + static_cast<int64_t>(i) * n * VW : sb + static_cast<int64_t>(j) * n * VW;
      for (int x0 = 0; x0 < n; x0 += 8)
        perm_chunk1(n - x0 < 8 ? n - x0 : 8, q, 2 * VW, D, kT + base, ldk, p, lp.hm, sr + x0 * VW,
                    i >= 0 ? pfa : pfb, lp, x0);
      return;
    }
    for (int c = 0, x0 = 0; c < nch; ++c) {
      const int len = (n - x0) / (nch - c);
      perm_chunk2(len, qs, qs + VW, 2 * VW, D, kT + base, ldk, p, lp.hm,
                  sa + (static_cast<int64_t>(i) * n + x0) * VW, sb + (static_cast<int64_t>(j) * n + x0) * VW, pfa, pfb,
                  lp, x0);
      x0 += len;
    }
  });
  add_bias_perm(sa, na, lp, nx, ba);
  add_bias_perm(sb, nb, lp, nx, bb);
  const int* lohi = lp.mask ? lp.lohi : nullptr;
  vf ma, mb;
  const vf suma = lane_softmax(sa, na, n, lohi, &ma, pfa), sumb = lane_softmax(sb, nb, n, lohi, &mb, pfb);
  if (rp) {
    // lane l's slot s is key p[l] + s, s < its count (lp.lohi)
    row_pv2(*rp, sa, sb, na, nb, n, lp.p, lp.lohi, lp.lohi + VW, Dv, suma, sumb, ma, mb);
    return;
  }
  const vf mula = 1.f / suma, mulb = 1.f / sumb;
  switch (n) {
#define NA_CASE(X) \
  case X: perm_sums2s<X>(sa, sb, vT, ldv, Dv, ra, na, rbb, nb, lp, mula, mulb, oa, ob); break;
    NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8) NA_CASE(9) NA_CASE(10)
    NA_CASE(11) NA_CASE(12) NA_CASE(13) NA_CASE(14) NA_CASE(15) NA_CASE(16)
#undef NA_CASE
    default: break;
  }
  lane_lse(ma, suma, lsea);
  lane_lse(mb, sumb, lseb);
}
#endif

#if defined(NA_ALIGNR_RUN2)
#define NA_RP , const RowPV* rp = nullptr
#define NA_RPA , rp
#else
#define NA_RP
#define NA_RPA
#endif
void exact_fwd2_impl(const float* qa, const float* qb, int64_t ldq, float scale, int64_t D, const float* kT,
                     int64_t ldk, const float* vT, int64_t ldv, int64_t Dv, const int64_t* ra, int na, const int64_t* rbb,
                     int nb, int nx, const int* lohi, float* sa, float* sb, float* oa, float* ob, float* lsea,
                     float* lseb, const float* const* ba, const float* const* bb NA_RP) {
  // the queries scaled once, side by side ([D][2][VW]) in the scratch after A's scores
  float* qs = sa + static_cast<int64_t>(na) * nx * VW;
  for (int64_t d = 0; d < D; ++d) {
    store(qs + 2 * d * VW, load(qa + d * ldq) * scale);
    store(qs + (2 * d + 1) * VW, load(qb + d * ldq) * scale);
  }
#if defined(NA_ALIGNR_RUN2)
  if (lohi) {
    LanePerm lp;
    if (lane_perm(lohi, nx, &lp)) {
      exact_fwd2_perm(qs, D, kT, ldk, vT, ldv, Dv, ra, na, rbb, nb, lp, sa, sb, oa, ob, lsea, lseb, nx, ba, bb NA_RPA);
      return;
    }
  }
#endif
  // slots of a key row in chunks of at most PAIR_SLOTS, as even as possible (nx = 7, AVX2: 4 + 3)
  const int nch = (nx + PAIR_SLOTS - 1) / PAIR_SLOTS;
  // the max folded into the score chunks where no slot is masked (the runs) and no bias comes after
  vf fa = splat(-INFINITY), fb = fa;
  vf *pfa = lohi || ba ? nullptr : &fa, *pfb = lohi || ba ? nullptr : &fb;
  for_union(ra, na, rbb, nb, [&](int i, int j, int64_t base) {
    if (i < 0 || j < 0) {
      // a row of one window only: up to 8 slots per pass (one query load per feature and pass)
      const float* q = i >= 0 ? qs : qs + VW;
      float* sr = i >= 0 ? sa + static_cast<int64_t>(i) * nx * VW : sb + static_cast<int64_t>(j) * nx * VW;
      for (int x0 = 0; x0 < nx; x0 += 8)
        scores_chunk1(nx - x0 < 8 ? nx - x0 : 8, q, 2 * VW, D, kT + base + x0, ldk, sr + x0 * VW, i >= 0 ? pfa : pfb);
      return;
    }
    for (int c = 0, x0 = 0; c < nch; ++c) {
      const int len = (nx - x0) / (nch - c);
      scores_chunk2(len, qs, qs + VW, 2 * VW, D, kT + base + x0, ldk, sa + (static_cast<int64_t>(i) * nx + x0) * VW,
                    sb + (static_cast<int64_t>(j) * nx + x0) * VW, pfa, pfb);
      x0 += len;
    }
  });
  add_bias(sa, na, nx, ba);
  add_bias(sb, nb, nx, bb);
  vf ma, mb;
  const vf suma = lane_softmax(sa, na, nx, lohi, &ma, pfa), sumb = lane_softmax(sb, nb, nx, lohi, &mb, pfb);
#if defined(NA_ALIGNR_RUN2)
  if (rp) {
    // slot x of lane l is key l + x; a border block's lane holds slots lo .. hi - 1
    alignas(64) int kb[VW], slo[VW], shi[VW];
    for (int l = 0; l < VW; ++l) {
      kb[l] = l;
      slo[l] = lohi ? lohi[l] : 0;
      shi[l] = lohi ? lohi[VW + l] : nx;
    }
    row_pv2(*rp, sa, sb, na, nb, nx, kb, slo, shi, Dv, suma, sumb, ma, mb);
    return;
  }
#endif
  slot_sums2(sa, sb, vT, ldv, Dv, ra, na, rbb, nb, nx, 1.f / suma, 1.f / sumb, oa, ob);
  lane_lse(ma, suma, lsea);
  lane_lse(mb, sumb, lseb);
}
void exact_fwd2(const float* qa, const float* qb, int64_t ldq, float scale, int64_t D, const float* kT, int64_t ldk,
                const float* vT, int64_t ldv, int64_t Dv, const int64_t* ra, int na, const int64_t* rbb, int nb, int nx,
                const int* lohi, float* sa, float* sb, float* oa, float* ob, float* lsea, float* lseb,
                const float* const* ba, const float* const* bb) {
  exact_fwd2_impl(qa, qb, ldq, scale, D, kT, ldk, vT, ldv, Dv, ra, na, rbb, nb, nx, lohi, sa, sb, oa, ob, lsea, lseb, ba,
                  bb);
}
#if defined(NA_ALIGNR_RUN2)
void exact_fwd2r(const float* qa, const float* qb, int64_t ldq, float scale, int64_t D, const float* kT, int64_t ldk,
                 int64_t Dv, const int64_t* ra, int na, const int64_t* rbb, int nb, int nx, const int* lohi, float* sa,
                 float* sb, const RowPV& rp, const float* const* ba, const float* const* bb) {
  exact_fwd2_impl(qa, qb, ldq, scale, D, kT, ldk, nullptr, 0, Dv, ra, na, rbb, nb, nx, lohi, sa, sb, nullptr, nullptr,
                  nullptr, nullptr, ba, bb, &rp);
}
#define NA_FWD2R exact_fwd2r
#else
#define NA_FWD2R nullptr
#endif
// P = exp(s - lse) inside the lanes' windows, dS = P * (dP - c) with c = sum over the lane's slots of
// P * dP - dlse: slot x of key row r to o.pt / o.dst + r * o.ldr + x * o.lds, and dS over s (the
// weights of dQ). sum P * dP equals dO . O (O = sum P v, dP = dO . v), so c needs no pass over the
// outputs: the backward's dO . O per query read each output row from memory (6% of C1's samples).
inline void bwd_p_ds(float* s, const float* dp, int nrows, int nx, const int* lohi, const float* lse,
                     const float* dlse, const SlotOut& o) {
  const vf lv = load(lse);
  const vi lo = lohi ? loadiu(lohi) : vi{}, hi = lohi ? loadiu(lohi + VW) : vi{} + nx;
  const int n = nrows * nx;
  vf c0{}, c1{};  // two chains: the sum is a dependency chain of n FMAs otherwise
  int j = 0;
  for (; !lohi && j + 2 <= n; j += 2) {
    const vf p0 = vexp(load(s + j * VW) - lv), p1 = vexp(load(s + (j + 1) * VW) - lv);
    store(s + j * VW, p0);
    store(s + (j + 1) * VW, p1);
    c0 += p0 * load(dp + j * VW);
    c1 += p1 * load(dp + (j + 1) * VW);
  }
  for (; j < n; ++j) {
    const vi xv = vi{} + j % nx;
    vf p = vexp(load(s + j * VW) - lv);
    p = ((xv >= lo) & (xv < hi)) ? p : vf{};
    store(s + j * VW, p);
    c0 += p * load(dp + j * VW);
  }
  const vf cv = c0 + c1 - load(dlse);
  // lanes whose query another block serves: left as they are when o.own
  const bool blend = o.own && lohi;
  const vi keep = lo >= hi;
  for (int r = 0, jj = 0; r < nrows; ++r)
    for (int x = 0; x < nx; ++x, ++jj) {
      const vf p = load(s + jj * VW);
      const vf ds = p * (load(dp + jj * VW) - cv);
      float* pp = o.pt + r * o.ldr + x * o.lds;
      float* dd = o.dst + r * o.ldr + x * o.lds;
      if (blend) {
        store(pp, keep ? load(pp) : p);
        store(dd, keep ? load(dd) : ds);
      } else {
        store(pp, p);
        store(dd, ds);
      }
      store(s + jj * VW, ds);
    }
}

// Backward of the exact-window path, query side: vw consecutive queries (one per lane), slot (r, x)
// of lane l is key rowbase[r] + x + l. qs/dO: the lanes' (scaled) queries and output gradients as
// columns of [D][ldq] / [Dv][ldo]. Recomputes P = exp(s - lse), dS = P * (dP - c) with dP = dO . v
// and c = sum P * dP - dlse (dlse: the lanes' lse gradients); writes P and dS to o (see bwd_p_ds),
// and dqT [D][vw] = dqscale * sum over slots of dS * k; s: 2 * nrows * nx * vw floats.
void exact_bwd_q(const float* qs, int64_t ldq, int64_t D, const float* kT, int64_t ldk, const float* vT, int64_t ldv,
                 int64_t Dv, const float* dO, int64_t ldo, const float* lse, const float* dlse, const int64_t* rowbase,
                 int nrows, int nx, const int* lohi, float* s, const SlotOut& o, float* dqT, float dqscale,
                 const float* const* bias) {
  const int n = nrows * nx;
  float* dp = s + static_cast<int64_t>(n) * VW;
  for (int r = 0; r < nrows; ++r) {
    for (int x0 = 0; x0 < nx; x0 += 8) {
      const int64_t o = (static_cast<int64_t>(r) * nx + x0) * VW;
      switch (nx - x0 < 8 ? nx - x0 : 8) {
#define NA_CASE(X)                                                                    \
  case X:                                                                             \
    exact_scores_run<X>(qs, ldq, D, kT + rowbase[r] + x0, ldk, s + o);    \
    exact_scores_run<X>(dO, ldo, Dv, vT + rowbase[r] + x0, ldv, dp + o);  \
    break;
        NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
        default: break;
      }
    }
  }
  add_bias(s, nrows, nx, bias);
  bwd_p_ds(s, dp, nrows, nx, lohi, lse, dlse, o);
  slot_sums(s, kT, ldk, D, rowbase, nrows, nx, splat(dqscale), dqT);
}

#if defined(NA_ALIGNR_RUN2)
// bwd_p_ds of a border block on lane_perm's slots (s: S, then P; dp: dP, then dS; both [nrows][n][vw]),
// which writes P and dS to o on the old slots (nx of them: old slot x of lane l is slot x - lo[l]
// here, zero outside the lane's window, as bwd_p_ds writes them; a masked slot's dS there was
// 0 * (dP - c), of either sign, +0 here)
inline void bwd_p_ds_perm(float* s, float* dp, int nrows, const LanePerm& lp, int nx, const int* lohi,
                          const float* lse, const float* dlse, const SlotOut& o) {
  const int n = lp.n;
  const vf lv = load(lse);
  const vi hi2 = loadiu(lp.lohi + VW);
  vf c0{}, c1{};
  for (int j = 0, r = 0; r < nrows; ++r)
    for (int x = 0; x < n; ++x, ++j) {
      vf p = vexp(load(s + j * VW) - lv);
      if (lp.mask) p = (vi{} + x) < hi2 ? p : vf{};
      store(s + j * VW, p);
      c0 += p * load(dp + j * VW);
    }
  const vf cv = c0 + c1 - load(dlse);
  for (int j = 0; j < nrows * n; ++j) store(dp + j * VW, load(s + j * VW) * (load(dp + j * VW) - cv));
  // lanes whose query another block serves: left as they are when o.own
  __mmask16 keep = 0;
  for (int l = 0; l < VW; ++l)
    if (lohi[l] >= lohi[VW + l]) keep = static_cast<__mmask16>(keep | (1u << l));
  if (!o.own) keep = 0;
  // per old slot x, the (new slot, lanes) pairs it takes, the same for every key row: listed once
  // (the tests and mask compares per row and diagonal cost as much as the loads, C3's profile)
  // (an old slot past 2 VW takes none: lane_perm keeps a lane's last key p + n - 1 <= 31, and old slot
  // x of lane l holds key x + l)
  const int nl = nx < 2 * VW ? nx : 2 * VW;
  int first[2 * VW + 1], from[2 * VW * VW];
  __mmask16 lanes[2 * VW * VW];
  int m = 0;
  for (int x = 0; x < nl; ++x) {
    first[x] = m;
    for (int i = 0; i < lp.nd; ++i) {
      const int xn = x - lp.dv[i];
      if (xn < 0 || xn >= n) continue;
      const __mmask16 mk = lp.dm[i] & _mm512_cmplt_epi32_mask(_mm512_set1_epi32(xn), __m512i(hi2));
      if (!mk) continue;
      from[m] = xn * VW;
      lanes[m++] = mk;
    }
  }
  first[nl] = m;
  for (int r = 0; r < nrows; ++r) {
    const float* sp = s + static_cast<int64_t>(r) * n * VW;
    const float* sd = dp + static_cast<int64_t>(r) * n * VW;
    for (int x = 0; x < nx; ++x) {
      float* pp = o.pt + r * o.ldr + x * o.lds;
      float* dd = o.dst + r * o.ldr + x * o.lds;
      // (no lane kept, as in most blocks: no load; a masked load of none still costs the line's access)
      __m512 P = keep ? _mm512_maskz_loadu_ps(keep, pp) : _mm512_setzero_ps();
      __m512 DS = keep ? _mm512_maskz_loadu_ps(keep, dd) : _mm512_setzero_ps();
      for (int e = x < nl ? first[x] : 0, e1 = x < nl ? first[x + 1] : 0; e < e1; ++e) {
        // (whole loads blended: as merge-masked loads they waited on each other, ~1% of C3's fwd+bwd)
        P = _mm512_mask_blend_ps(lanes[e], P, __m512(load_reg(sp + from[e])));
        DS = _mm512_mask_blend_ps(lanes[e], DS, __m512(load_reg(sd + from[e])));
      }
      store(pp, vf(P));
      store(dd, vf(DS));
    }
  }
}
// exact_bwd_q2 of a border block on lane_perm's slots
void exact_bwd_q2_perm(const float* qa, const float* qb, int64_t ldq, int64_t D, const float* kT, int64_t ldk,
                       const float* vT, int64_t ldv, int64_t Dv, const float* doa, const float* dob, int64_t ldo,
                       const float* lsea, const float* lseb, const float* dlsea, const float* dlseb, const int64_t* ra,
                       int na, const int64_t* rbb, int nb, int nx, const int* lohi, const LanePerm& lp, float* sa,
                       float* sb, const SlotOut& outa, const SlotOut& outb, float* dqa, float* dqb, float dqscale,
                       const float* const* ba, const float* const* bb) {
  const int n = lp.n;
  const vi p = *reinterpret_cast<const vi*>(lp.p);
  float* dpa = sa + static_cast<int64_t>(na) * n * VW;
  float* dpb = sb + static_cast<int64_t>(nb) * n * VW;
  const int nch = (n + PAIR_SLOTS - 1) / PAIR_SLOTS;
  for_union(ra, na, rbb, nb, [&](int i, int j, int64_t base) {
    if (i < 0 || j < 0) {
      const float* q = i >= 0 ? qa : qb;
      const float* dO = i >= 0 ? doa : dob;
      const int64_t off = (i >= 0 ? static_cast<int64_t>(i) : static_cast<int64_t>(j)) * n * VW;
      float* s = (i >= 0 ? sa : sb) + off;
      float* d = (i >= 0 ? dpa : dpb) + off;
      for (int x0 = 0; x0 < n; x0 += 8) {
        const int len = n - x0 < 8 ? n - x0 : 8;
        perm_chunk1(len, q, ldq, D, kT + base, ldk, p, lp.hm, s + x0 * VW, nullptr, lp, x0);
        perm_chunk1(len, dO, ldo, Dv, vT + base, ldv, p, lp.hm, d + x0 * VW, nullptr, lp, x0);
      }
      return;
    }
    for (int c = 0, x0 = 0; c < nch; ++c) {
      const int len = (n - x0) / (nch - c);
      const int64_t oa = (static_cast<int64_t>(i) * n + x0) * VW, ob = (static_cast<int64_t>(j) * n + x0) * VW;
      perm_chunk2(len, qa, qb, ldq, D, kT + base, ldk, p, lp.hm, sa + oa, sb + ob, nullptr, nullptr, lp, x0);
      perm_chunk2(len, doa, dob, ldo, Dv, vT + base, ldv, p, lp.hm, dpa + oa, dpb + ob, nullptr, nullptr, lp, x0);
      x0 += len;
    }
  });
  add_bias_perm(sa, na, lp, nx, ba);
  add_bias_perm(sb, nb, lp, nx, bb);
  bwd_p_ds_perm(sa, dpa, na, lp, nx, lohi, lsea, dlsea, outa);
  bwd_p_ds_perm(sb, dpb, nb, lp, nx, lohi, lseb, dlseb, outb);
  switch (n) {
#define NA_CASE(X) \
  case X: perm_sums2s<X>(dpa, dpb, kT, ldk, D, ra, na, rbb, nb, lp, splat(dqscale), splat(dqscale), dqa, dqb); break;
    NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8) NA_CASE(9) NA_CASE(10)
    NA_CASE(11) NA_CASE(12) NA_CASE(13) NA_CASE(14) NA_CASE(15) NA_CASE(16)
#undef NA_CASE
    default: break;
  }
}
#endif

// exact_bwd_q of two blocks (A, B) at the same lanes of two query rows (see exact_fwd2): the key and
// value loads of key rows in both windows serve both blocks. sa: 2 * na * nx * vw floats, sb: 2 * nb * nx * vw.
void exact_bwd_q2(const float* qa, const float* qb, int64_t ldq, int64_t D, const float* kT, int64_t ldk,
                  const float* vT, int64_t ldv, int64_t Dv, const float* doa, const float* dob, int64_t ldo,
                  const float* lsea, const float* lseb, const float* dlsea, const float* dlseb, const int64_t* ra, int na,
                  const int64_t* rbb, int nb, int nx, const int* lohi, float* sa, float* sb, const SlotOut& outa,
                  const SlotOut& outb, float* dqa, float* dqb, float dqscale, const float* const* ba,
                  const float* const* bb) {
#if defined(NA_ALIGNR_RUN2)
  if (lohi) {
    LanePerm lp;
    if (lane_perm(lohi, nx, &lp)) {
      exact_bwd_q2_perm(qa, qb, ldq, D, kT, ldk, vT, ldv, Dv, doa, dob, ldo, lsea, lseb, dlsea, dlseb, ra, na, rbb, nb,
                        nx, lohi, lp, sa, sb, outa, outb, dqa, dqb, dqscale, ba, bb);
      return;
    }
  }
#endif
  float* dpa = sa + static_cast<int64_t>(na) * nx * VW;
  float* dpb = sb + static_cast<int64_t>(nb) * nx * VW;
  const int nch = (nx + PAIR_SLOTS - 1) / PAIR_SLOTS;
  for_union(ra, na, rbb, nb, [&](int i, int j, int64_t base) {
    for (int c = 0, x0 = 0; c < nch; ++c) {
      const int len = (nx - x0) / (nch - c);
      const int64_t oa = (static_cast<int64_t>(i) * nx + x0) * VW, ob = (static_cast<int64_t>(j) * nx + x0) * VW;
      if (i >= 0 && j >= 0) {
        scores_chunk2(len, qa, qb, ldq, D, kT + base + x0, ldk, sa + oa, sb + ob);
        scores_chunk2(len, doa, dob, ldo, Dv, vT + base + x0, ldv, dpa + oa, dpb + ob);
      } else if (i >= 0) {
        scores_chunk1(len, qa, ldq, D, kT + base + x0, ldk, sa + oa);
        scores_chunk1(len, doa, ldo, Dv, vT + base + x0, ldv, dpa + oa);
      } else {
        scores_chunk1(len, qb, ldq, D, kT + base + x0, ldk, sb + ob);
        scores_chunk1(len, dob, ldo, Dv, vT + base + x0, ldv, dpb + ob);
      }
      x0 += len;
    }
  });
  add_bias(sa, na, nx, ba);
  add_bias(sb, nb, nx, bb);
  bwd_p_ds(sa, dpa, na, nx, lohi, lsea, dlsea, outa);
  bwd_p_ds(sb, dpb, nb, nx, lohi, lseb, dlseb, outb);
  slot_sums2(sa, sb, kT, ldk, D, ra, na, rbb, nb, nx, splat(dqscale), splat(dqscale), dqa, dqb);
}

// features per pass of the key side: 8 with 32 vector registers (R = 3: 11 loads per 24 FMAs, most
// of them unaligned), 4 with 16
#if defined(NA_VARIANT_avx512)
constexpr int KV_C = 8;
#else
constexpr int KV_C = 4;
#endif

// The key side's sums for R key rows at once over S sources (weights w[s][i], operand x[s]) and C features,
// in one register pass: acc[i][c * lda + kk0 + l] += sum_s sum_xx w[s][i][xx * lds + kk0 - xx + l] *
// x[s][c * ldx + kk0 - xx + l], source 0's additions then source 1's, as S separate passes would make them.
// The query-side operand x[s] does not depend on the key row, so each of its loads serves all R rows
// (R = 3, C = 4: 7 loads per 12 FMAs; R = 1: 9 per 8)
template <int S, int R, int C>
inline void exact_kv_chunk(const float* const (*w)[R], int64_t lds, const float* const* x, int64_t ldx,
                           float* const* acc, int64_t lda, int nx, int kk0) {
  vf a[R][C];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) a[i][c] = load(acc[i] + c * lda + kk0);
#pragma GCC unroll 2
  for (int s = 0; s < S; ++s) {
    const float* xs = x[s];
    for (int xx = 0; xx < nx; ++xx) {
      const int off = kk0 - xx;
      vf wv[R];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) wv[i] = load(w[s][i] + xx * lds + off);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        const vf xv = R > 1 ? load_reg(xs + c * ldx + off) : load(xs + c * ldx + off);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) a[i][c] += wv[i] * xv;
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) store(acc[i] + c * lda + kk0, a[i][c]);
}

// exact_kv_chunk's sums for key rows r0 + [0, R), C features at a time (then 4, then one at a time);
// wrow(s, r) is source s's weight row of key row r
template <int S, int R, int C, typename WRow>
inline void exact_kv_rows(WRow wrow, int64_t lds, const float* const* x, int64_t ldx, int64_t W, float* accT,
                          int64_t lda, const int64_t* rowbase, int r0, int nx, int nk, const int* vr) {
  float* ar[R];
  for (int i = 0; i < R; ++i) ar[i] = accT + rowbase[r0 + i];
  for (int kk0 = 0; kk0 < nk; kk0 += VW) {
    // key vector v's slots [lo, hi) as slots [0, hi - lo) of shifted operands
    const int lo = vr ? vr[2 * (kk0 / VW)] : 0, n = vr ? vr[2 * (kk0 / VW) + 1] - lo : nx;
    if (n <= 0) continue;
    const float* wr[S][R];
    const float* xs[S];
    for (int s = 0; s < S; ++s) {
      for (int i = 0; i < R; ++i) wr[s][i] = wrow(s, r0 + i) + lo * (lds - 1);
      xs[s] = x[s] - lo;
    }
    auto chunk = [&](auto cw, int64_t c) {
      float* ac[R];
      for (int i = 0; i < R; ++i) ac[i] = ar[i] + c * lda;
      const float* xc[S];
      for (int s = 0; s < S; ++s) xc[s] = xs[s] + c * ldx;
      exact_kv_chunk<S, R, decltype(cw)::value>(wr, lds, xc, ldx, ac, lda, n, kk0);
    };
    int64_t c = 0;
    for (; c + C <= W; c += C) {
      // the next chunk's accumulators (rows lda apart: L2, not L1, and no hardware prefetcher
      // follows R * W streams), requested a chunk ahead
      for (int j = 0; j < C; ++j) {
        const int64_t cn = c + C + j < W ? c + C + j : j;
        const int kn = c + C + j < W ? kk0 : kk0 + VW;
        for (int i = 0; i < R; ++i) __builtin_prefetch(ar[i] + cn * lda + kn + VW - 1, 1);
      }
      chunk(std::integral_constant<int, C>{}, c);
    }
    for (; C > 4 && c + 4 <= W; c += 4) chunk(std::integral_constant<int, 4>{}, c);
    for (; c < W; ++c) chunk(std::integral_constant<int, 1>{}, c);
  }
}

// every key row, in threes (distinct rows are >= one axis length apart, so their vectors of one kk0 never
// overlap; the + 0 written past a run may land in another row, read back before it is written again)
template <int S, typename WRow>
inline void exact_kv_all(WRow wrow, int64_t lds, const float* const* x, int64_t ldx, int64_t W, float* accT,
                         int64_t lda, const int64_t* rowbase, int nrows, int nx, int nk, const int* vr) {
  int r = 0;
  // rows closer than a vector (a last axis shorter than VW: 2D/3D groups of fewer queries than lanes)
  // would load and store overlapping vectors in one pass, losing sums: one row at a time then
  bool apart = true;
  for (int i = 1; i < nrows; ++i) apart = apart && std::llabs(rowbase[i] - rowbase[i - 1]) >= VW;
  if (!apart) {
    for (; r < nrows; ++r) exact_kv_rows<S, 1, 8>(wrow, lds, x, ldx, W, accT, lda, rowbase, r, nx, nk, vr);
    return;
  }
  for (; r + 3 <= nrows; r += 3) exact_kv_rows<S, 3, KV_C>(wrow, lds, x, ldx, W, accT, lda, rowbase, r, nx, nk, vr);
  for (; r + 2 <= nrows; r += 2) exact_kv_rows<S, 2, KV_C>(wrow, lds, x, ldx, W, accT, lda, rowbase, r, nx, nk, vr);
  for (; r < nrows; ++r) exact_kv_rows<S, 1, 8>(wrow, lds, x, ldx, W, accT, lda, rowbase, r, nx, nk, vr);
}

// Backward of the exact-window path, key side, for queries t whose slot (r, x) is key t + x of key row
// r: accT[c][rowbase[r] + kk] += sum_x w[r * ldr + x * lds + kk - x] * x[c * ldx + kk - x] for kk in
// [0, nk) and c < W, x in [0, nx), or, with vr, x in [vr[2v], vr[2v + 1]) for the keys of vector v
// (kk in [v * vw, (v + 1) * vw): the slots that vector's queries use). w and x are dS (or P) and the
// scaled queries (or output gradients), with zeros wherever a slot is outside its query's window;
// whole vectors are written (columns past nk get + 0), so accT needs vw floats of slack.
void exact_bwd_kv(const float* w, int64_t lds, int64_t ldr, const float* x, int64_t ldx, int64_t W, float* accT,
                  int64_t lda, const int64_t* rowbase, int nrows, int nx, int nk, const int* vr) {
  exact_kv_all<1>([=](int, int r) { return w + r * ldr; }, lds, &x, ldx, W, accT, lda, rowbase, nrows, nx, nk, vr);
}

// exact_bwd_kv for two sources (a row pair's dS or P over its shared key rows: weight rows w0[r], w1[r],
// operands x0, x1) in one pass over the accumulators; w1 null: source 0 alone
void exact_bwd_kv2(const float* const* w0, const float* const* w1, int64_t lds, const float* x0, const float* x1,
                   int64_t ldx, int64_t W, float* accT, int64_t lda, const int64_t* rowbase, int nrows, int nx, int nk,
                   const int* vr) {
  const float* x[2] = {x0, x1};
  if (w1)
    exact_kv_all<2>([=](int s, int r) { return (s ? w1 : w0)[r]; }, lds, x, ldx, W, accT, lda, rowbase, nrows, nx,
                    nk, vr);
  else
    exact_kv_all<1>([=](int, int r) { return w0[r]; }, lds, x, ldx, W, accT, lda, rowbase, nrows, nx, nk, vr);
}

// dst[c * ld + j] = src[j][c] for 8 tokens j and c < w
// 8x8 blocks in 256-bit vectors whatever the variant's width (SSE2 builds split them in two)
typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));


// Lane x of the result: the sum of a[x]'s lanes (VW dot products finished at once).
inline vf reduce_lanes(const vf* a) {
#if defined(NA_VARIANT_avx2)
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return vf(_mm256_permute2f128_ps(u0, u1, 0x20)) + vf(_mm256_permute2f128_ps(u0, u1, 0x31));
#else
  vf r;
  for (int x = 0; x < VW; ++x) r[x] = hsum(a[x]);
  return r;
#endif
}

// scores of one row against VW rows at once: out[x] = q . rows[x] over D features
inline vf row_dots(const float* q, const float* const* rows, int64_t D) {
  vf a[VW];
#pragma GCC unroll 16
  for (int x = 0; x < VW; ++x) a[x] = vf{};
  int64_t d = 0;
  for (; d + VW <= D; d += VW) {
    const vf qv = load(q + d);
#pragma GCC unroll 16
    for (int x = 0; x < VW; ++x) a[x] += qv * load(rows[x] + d);
  }
  for (; d < D; ++d)
    for (int x = 0; x < VW; ++x) a[x][0] += q[d] * rows[x][d];
  return reduce_lanes(a);
}

// Backward of one query of one head in the inputs' own heads-last rows (1D; features across the
// vector, slots across the lanes after a reduction): no transposes in or out. Its n keys/values are
// rows k + x * kstep / v + x * vstep (x < n). Recomputes S = scale q.k,
// P = exp(S - lse), dP = dO.v, c = sum P dP - dlse, dS = P (dP - c); writes dq = scale sum dS k and
// adds scale dS q / P dO to the key / value accumulators acc + ((r0 + x) & rmask) * rw (dK at
// [0, D), dV at [D, D + Dv)). zeros: max(D, Dv) zeros (the padding lanes' rows); s: 2 * round_up(n,
// VW) floats. Only in-window pairs are multiplied: inf/NaN inputs reach exactly where the definition
// takes them.
void row_bwd(const float* q, const float* dO, const float* k, int64_t kstep, const float* v, int64_t vstep, int n,
             int64_t D, int64_t Dv, float scale, float lse, float dlse, const float* zeros, float* s, float* dq,
             float* acc, int64_t rw, int rmask, int r0) {
  const int nb = (n + VW - 1) / VW;
  float* dp = s + nb * VW;
  vf cs{};
  for (int b = 0; b < nb; ++b) {
    const float* kr[VW];
    const float* vr[VW];
#pragma GCC unroll 16
    for (int x = 0; x < VW; ++x) {
      const int j = b * VW + x;
      kr[x] = j < n ? k + j * kstep : zeros;
      vr[x] = j < n ? v + j * vstep : zeros;
    }
    const vi valid = lanes() < (n - b * VW);
    const vf sv = row_dots(q, kr, D), dpv = row_dots(dO, vr, Dv);
    vf p = vexp(sv * scale - lse);
    p = valid ? p : vf{};
    store(s + b * VW, p);
    store(dp + b * VW, dpv);
    cs += p * dpv;
  }
  const vf c = bcast_sum(cs) - dlse;
  for (int b = 0; b < nb; ++b) store(dp + b * VW, load(s + b * VW) * (load(dp + b * VW) - c));
  int64_t d = 0;
  for (; d + VW <= D; d += VW) {
    vf a0{}, a1{};
    int x = 0;
    for (; x + 2 <= n; x += 2) {
      a0 += dp[x] * load(k + x * kstep + d);
      a1 += dp[x + 1] * load(k + (x + 1) * kstep + d);
    }
    if (x < n) a0 += dp[x] * load(k + x * kstep + d);
    store(dq + d, (a0 + a1) * scale);
  }
  for (; d < D; ++d) {
    float a0 = 0.f;
    for (int x = 0; x < n; ++x) a0 += dp[x] * k[x * kstep + d];
    dq[d] = a0 * scale;
  }
  for (int x = 0; x < n; ++x) {
    float* ak = acc + static_cast<int64_t>((r0 + x) & rmask) * rw;
    float* av = ak + D;
    const float w = dp[x] * scale, p = s[x];
    int64_t e = 0;
    for (; e + VW <= D; e += VW) store(ak + e, load(ak + e) + w * load(q + e));
    for (; e < D; ++e) ak[e] += w * q[e];
    for (e = 0; e + VW <= Dv; e += VW) store(av + e, load(av + e) + p * load(dO + e));
    for (; e < Dv; ++e) av[e] += p * dO[e];
  }
}


// Forward of queries in the inputs' own heads-last rows (1D; as row_bwd, two at a time): S = scale
// q.k over the n keys k + x * kstep, P = softmax(S), out = P . v (rows v + x * vstep), lse. s:
// 2 * round_up(n, VW) floats. G (2D/3D): key/value x at k + koff[x] * kstep / v + koff[x] * vstep
// instead (koff: token offsets of a window of several last-axis segments, gathered by the caller).
template <int NQ, bool G = false>
inline void row_fwd_n(const RowQuery* qs, int64_t kstep, int64_t vstep, int n, int64_t D, int64_t Dv, float scale,
                      const float* zeros, float* s, const int64_t* koff = nullptr) {
  const int nb = (n + VW - 1) / VW;
  float* ps[NQ];
  vf mv[NQ];
#pragma GCC unroll 2
  for (int i = 0; i < NQ; ++i) {
    ps[i] = s + i * nb * VW;
    mv[i] = splat(-INFINITY);
  }
  for (int b = 0; b < nb; ++b) {
    const vi valid = lanes() < (n - b * VW);
#pragma GCC unroll 2
    for (int i = 0; i < NQ; ++i) {
      const float* kr[VW];
#pragma GCC unroll 16
      for (int x = 0; x < VW; ++x) {
        const int j = b * VW + x;
        kr[x] = j < n ? qs[i].k + (G ? koff[j] : j) * kstep : zeros;
      }
      vf sv = row_dots(qs[i].q, kr, D) * scale;
      sv = valid ? sv : splat(-INFINITY);
      store(ps[i] + b * VW, sv);
      mv[i] = sv > mv[i] ? sv : mv[i];
    }
  }
  vf m[NQ], sum[NQ];
#pragma GCC unroll 2
  for (int i = 0; i < NQ; ++i) {
    m[i] = bcast_max(mv[i]);
    m[i] = m[i] == -INFINITY ? vf{} : m[i];  // only NaN scores: let the NaN through exp
    sum[i] = vf{};
  }
  for (int b = 0; b < nb; ++b)
#pragma GCC unroll 2
    for (int i = 0; i < NQ; ++i) {
      const vf p = vexp(load(ps[i] + b * VW) - m[i]);
      store(ps[i] + b * VW, p);
      sum[i] += p;
    }
  vf tot[NQ], inv[NQ];
#pragma GCC unroll 2
  for (int i = 0; i < NQ; ++i) {
    tot[i] = bcast_sum(sum[i]);
    inv[i] = 1.f / tot[i];
  }
  int64_t d = 0;
  // four value vectors per pass over the slots: with two queries, eight independent sums (the loop
  // below keeps two per query, and waited on the FMA latency)
  for (; d + 4 * VW <= Dv; d += 4 * VW) {
    vf acc[NQ][4];
#pragma GCC unroll 2
    for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) acc[i][u] = vf{};
    for (int x = 0; x < n; ++x)
#pragma GCC unroll 2
      for (int i = 0; i < NQ; ++i) {
        const vf p = splat(ps[i][x]);
        const float* vr = qs[i].v + (G ? koff[x] : x) * vstep + d;
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) acc[i][u] += p * load(vr + u * VW);
      }
#pragma GCC unroll 2
    for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) store(qs[i].out + d + u * VW, acc[i][u] * inv[i]);
  }
  for (; d + VW <= Dv; d += VW) {
    vf a0[NQ], a1[NQ];
#pragma GCC unroll 2
    for (int i = 0; i < NQ; ++i) a0[i] = a1[i] = vf{};
    int x = 0;
    for (; x + 2 <= n; x += 2)
#pragma GCC unroll 2
      for (int i = 0; i < NQ; ++i) {
        a0[i] += ps[i][x] * load(qs[i].v + (G ? koff[x] : x) * vstep + d);
        a1[i] += ps[i][x + 1] * load(qs[i].v + (G ? koff[x + 1] : x + 1) * vstep + d);
      }
#pragma GCC unroll 2
    for (int i = 0; i < NQ; ++i) {
      if (x < n) a0[i] += ps[i][x] * load(qs[i].v + (G ? koff[x] : x) * vstep + d);
      store(qs[i].out + d, (a0[i] + a1[i]) * inv[i]);
    }
  }
  for (; d < Dv; ++d)
    for (int i = 0; i < NQ; ++i) {
      float a0 = 0.f;
      for (int x = 0; x < n; ++x) a0 += ps[i][x] * qs[i].v[(G ? koff[x] : x) * vstep + d];
      qs[i].out[d] = a0 * inv[i][0];
    }
  // the sum is >= 1 (the max contributes exp(0)) unless NaN
  for (int i = 0; i < NQ; ++i) {
    const float t = tot[i][0];
    *qs[i].lse = t >= 1.f && t < INFINITY ? (m[i] + vlog(tot[i]))[0] : m[i][0] + std::log(t);
  }
}

#if defined(NA_VARIANT_avx512)
// Two queries of at most 8 keys each in one 16-lane vector (query A's slots in lanes 0-7, B's in
// 8-15): the 8-wide row forward's work for two queries in one pass of 512-bit instructions.
// Lane x of the result: the sum of a[x]'s lanes (four levels of block/lane shuffles and adds, then
// one permute back into slot order).
inline vf reduce_lanes16(const vf* a) {
  __m512 c[8], e[4], f[2];
  for (int i = 0; i < 8; ++i)  // c[i]: a[i]'s partial sums in blocks 0-1, a[i + 8]'s in blocks 2-3
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // e[i]'s blocks: a[i], a[i + 8], a[i + 4], a[i + 12]
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[i], c[i + 4], 0x88), _mm512_shuffle_f32x4(c[i], c[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)  // f[i]: pairs of lanes per block, e[i]'s then e[i + 2]'s
    f[i] = _mm512_add_ps(_mm512_shuffle_ps(e[i], e[i + 2], 0x44), _mm512_shuffle_ps(e[i], e[i + 2], 0xEE));
  // lanes of h: a[0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15]
  const __m512 h = _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], 0x88), _mm512_shuffle_ps(f[0], f[1], 0xDD));
  return vf(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), h));
}
// every lane: the max / the sum of the 8 lanes of its half
inline vf half_max(vf v) {
  __m512 t = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
  t = _mm512_max_ps(t, _mm512_shuffle_ps(t, t, 0x4E));
  return vf(_mm512_max_ps(t, _mm512_shuffle_ps(t, t, 0xB1)));
}
inline vf half_sum(vf v) {
  __m512 t = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
  t = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0x4E));
  return vf(_mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0xB1)));
}
// features d .. d + w (w < VW) as a vector, the rest zero
inline vf load_part(const float* p, int w) { return vf(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << w) - 1), p)); }

// row_fwd_n<2> for n <= 8 (a and b may be the same query): S for both queries from 16 dot products
// finished by one reduction, one softmax over both halves, P.V of both in one pass of 2 x 2 vectors
// per feature block (even and odd slots summed apart: eight independent sums)
inline void row_fwd_pair16(const RowQuery& qa, const RowQuery& qb, int64_t kstep, int64_t vstep, int n, int64_t D,
                           int64_t Dv, float scale, const float* zeros, float* s) {
  const float* kr[VW];
#pragma GCC unroll 8
  for (int x = 0; x < 8; ++x) {
    kr[x] = x < n ? qa.k + x * kstep : zeros;
    kr[8 + x] = x < n ? qb.k + x * kstep : zeros;
  }
  vf a[VW];
#pragma GCC unroll 16
  for (int x = 0; x < VW; ++x) a[x] = vf{};
  int64_t d = 0;
  for (; d + VW <= D; d += VW) {
    const vf va = load(qa.q + d), vb = load(qb.q + d);
#pragma GCC unroll 8
    for (int x = 0; x < 8; ++x) {
      a[x] += va * load(kr[x] + d);
      a[8 + x] += vb * load(kr[8 + x] + d);
    }
  }
  if (d < D) {
    const int w = static_cast<int>(D - d);
    const vf va = load_part(qa.q + d, w), vb = load_part(qb.q + d, w);
#pragma GCC unroll 8
    for (int x = 0; x < 8; ++x) {
      a[x] += va * load_part(kr[x] + d, w);
      a[8 + x] += vb * load_part(kr[8 + x] + d, w);
    }
  }
  const vf ninf = splat(-INFINITY);
  vf sv = reduce_lanes16(a) * scale;
  sv = (lanes() & 7) < n ? sv : ninf;
  vf m = half_max(sv > ninf ? sv : ninf);  // NaN scores left out of the max, as row_fwd_n
  m = m == ninf ? vf{} : m;                // only NaN scores: let the NaN through exp
  const vf p = vexp(sv - m);
  store(s, p);
  const vf tot = half_sum(p), inv = 1.f / tot;
  const float ia = inv[0], ib = inv[8];
  const float* va = qa.v;
  const float* vb = qb.v;
  d = 0;
  for (; d + 2 * VW <= Dv; d += 2 * VW) {
    vf e0{}, e1{}, f0{}, f1{}, g0{}, g1{}, h0{}, h1{};  // A even/odd, B even/odd; two vectors each
    int x = 0;
    for (; x + 2 <= n; x += 2) {
      const vf pa0 = splat(s[x]), pa1 = splat(s[x + 1]), pb0 = splat(s[8 + x]), pb1 = splat(s[9 + x]);
      const float* a0 = va + x * vstep + d;
      const float* a1 = a0 + vstep;
      const float* b0 = vb + x * vstep + d;
      const float* b1 = b0 + vstep;
      e0 += pa0 * load(a0);
      e1 += pa0 * load(a0 + VW);
      f0 += pa1 * load(a1);
      f1 += pa1 * load(a1 + VW);
      g0 += pb0 * load(b0);
      g1 += pb0 * load(b0 + VW);
      h0 += pb1 * load(b1);
      h1 += pb1 * load(b1 + VW);
    }
    if (x < n) {
      const vf pa0 = splat(s[x]), pb0 = splat(s[8 + x]);
      const float* a0 = va + x * vstep + d;
      const float* b0 = vb + x * vstep + d;
      e0 += pa0 * load(a0);
      e1 += pa0 * load(a0 + VW);
      g0 += pb0 * load(b0);
      g1 += pb0 * load(b0 + VW);
    }
    store(qa.out + d, (e0 + f0) * ia);
    store(qa.out + d + VW, (e1 + f1) * ia);
    store(qb.out + d, (g0 + h0) * ib);
    store(qb.out + d + VW, (g1 + h1) * ib);
  }
  // the last one or two blocks of features, the last one partial when Dv is not a multiple of VW
  for (; d < Dv; d += VW) {
    const int w = Dv - d < VW ? static_cast<int>(Dv - d) : VW;
    const __mmask16 mk = static_cast<__mmask16>((1u << w) - 1);
    vf e0{}, f0{}, g0{}, h0{};
    int x = 0;
    for (; x + 2 <= n; x += 2) {
      e0 += splat(s[x]) * vf(_mm512_maskz_loadu_ps(mk, va + x * vstep + d));
      f0 += splat(s[x + 1]) * vf(_mm512_maskz_loadu_ps(mk, va + (x + 1) * vstep + d));
      g0 += splat(s[8 + x]) * vf(_mm512_maskz_loadu_ps(mk, vb + x * vstep + d));
      h0 += splat(s[9 + x]) * vf(_mm512_maskz_loadu_ps(mk, vb + (x + 1) * vstep + d));
    }
    if (x < n) {
      e0 += splat(s[x]) * vf(_mm512_maskz_loadu_ps(mk, va + x * vstep + d));
      g0 += splat(s[8 + x]) * vf(_mm512_maskz_loadu_ps(mk, vb + x * vstep + d));
    }
    _mm512_mask_storeu_ps(qa.out + d, mk, __m512((e0 + f0) * ia));
    _mm512_mask_storeu_ps(qb.out + d, mk, __m512((g0 + h0) * ib));
  }
  // the sum is >= 1 (the max contributes exp(0)) unless NaN
  const vf lv = m + vlog(tot);
  const float ta = tot[0], tb = tot[8];
  *qa.lse = ta >= 1.f && ta < INFINITY ? lv[0] : m[0] + std::log(ta);
  *qb.lse = tb >= 1.f && tb < INFINITY ? lv[8] : m[8] + std::log(tb);
}
#endif

void row_fwd(const RowQuery* qs, int nq, int64_t kstep, int64_t vstep, int n, int64_t D, int64_t Dv, float scale,
             const float* zeros, float* s) {
#if defined(NA_VARIANT_avx512)
  // windows of up to 8 keys: two queries to a vector; longer ones: the AVX2 table's 8-wide kernel
  // (16 slots to a block would be mostly padding at small K and cost 16-vector reductions)
  if (n <= 8) {
    int i = 0;
    for (; i + 2 <= nq; i += 2) row_fwd_pair16(qs[i], qs[i + 1], kstep, vstep, n, D, Dv, scale, zeros, s);
    if (i < nq) row_fwd_pair16(qs[i], qs[i], kstep, vstep, n, D, Dv, scale, zeros, s);
  } else {
    kernels_avx2()->row_fwd(qs, nq, kstep, vstep, n, D, Dv, scale, zeros, s);
  }
  return;
#endif
  int i = 0;
  for (; i + 2 <= nq; i += 2) row_fwd_n<2>(qs + i, kstep, vstep, n, D, Dv, scale, zeros, s);
  if (i < nq) row_fwd_n<1>(qs + i, kstep, vstep, n, D, Dv, scale, zeros, s);
}

void row_fwd_g(const RowQuery* qs, int nq, const int64_t* koff, int64_t kstep, int64_t vstep, int n, int64_t D,
               int64_t Dv, float scale, const float* zeros, float* s) {
  int i = 0;
  for (; i + 2 <= nq; i += 2) row_fwd_n<2, true>(qs + i, kstep, vstep, n, D, Dv, scale, zeros, s, koff);
  if (i < nq) row_fwd_n<1, true>(qs + i, kstep, vstep, n, D, Dv, scale, zeros, s, koff);
}

// CHECK: also returns whether every value read is finite (x * 0 is 0 for finite x, NaN otherwise)
template <bool CHECK>
inline bool transpose8_impl(const float* const* src, int64_t w, float* dst, int64_t ld) {
  int64_t c0 = 0;
  v8 fin{};
#if defined(__clang__)
#define NA_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define NA_SHUF(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif
  for (; c0 + 8 <= w; c0 += 8) {
    v8 r[8];
    for (int j = 0; j < 8; ++j) r[j] = *reinterpret_cast<const v8u*>(src[j] + c0);
    if (CHECK)
      for (int j = 0; j < 8; ++j) fin += r[j] * 0.f;
    v8 t[8], u[8];
    for (int j = 0; j < 8; j += 2) {
      t[j] = NA_SHUF(r[j], r[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
      t[j + 1] = NA_SHUF(r[j], r[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int j = 0; j < 8; j += 4) {
      u[j] = NA_SHUF(t[j], t[j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[j + 1] = NA_SHUF(t[j], t[j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
      u[j + 2] = NA_SHUF(t[j + 1], t[j + 3], 0, 1, 8, 9, 4, 5, 12, 13);
      u[j + 3] = NA_SHUF(t[j + 1], t[j + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int c = 0; c < 4; ++c) {
      *reinterpret_cast<v8u*>(dst + (c0 + c) * ld) = NA_SHUF(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
      *reinterpret_cast<v8u*>(dst + (c0 + c + 4) * ld) = NA_SHUF(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
  }
#undef NA_SHUF

  float tail = 0.f;
  for (; c0 < w; ++c0)
    for (int j = 0; j < 8; ++j) {
      dst[c0 * ld + j] = src[j][c0];
      if (CHECK) tail += src[j][c0] * 0.f;
    }
  if (!CHECK) return true;
  for (int i = 0; i < 8; ++i) tail += fin[i];
  return tail == 0.f;
}

void transpose8(const float* const* src, int64_t w, float* dst, int64_t ld) { transpose8_impl<false>(src, w, dst, ld); }
bool transpose8_finite(const float* const* src, int64_t w, float* dst, int64_t ld) {
  return transpose8_impl<true>(src, w, dst, ld);
}

// ---------------------------------------------------------------- float16 / bfloat16 rows
// Rows of n values converted as MLX's own CPU conversions do (mlx/types/fp16.h and bf16.h, what
// static_cast<mx::float16_t> and astype compute where the CPU has no native half types), bitwise:
// float32 -> float16 rounds to nearest even (vcvtps2ph with that rounding mode gives MLX's result for
// every value that is not NaN) and NaN becomes sign | 0x7D00; float32 -> bfloat16 rounds to nearest
// even in integer arithmetic and NaN becomes 0x7FC0 (no sign); float16 -> float32 is exact (vcvtph2ps)
// and bfloat16 -> float32 a shift. The C++ boundary converted one value at a time through MLX's
// types: float16 calls took 4x as long as float32 ones (C2), bfloat16 2x. AVX2 / AVX-512 tables only
// (F16C); elsewhere the boundary keeps MLX's own conversions (native on ARM).
#if defined(NA_VARIANT_avx2) || defined(NA_VARIANT_avx512)
inline __m256 h2f8(const uint16_t* s) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))); }
inline __m256 b2f8(const uint16_t* s) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))), 16));
}
inline __m128i f2h8(__m256 x) {
  __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const int nan = _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  if (nan) {
    alignas(16) uint16_t r[8];
    alignas(32) uint32_t u[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(r), h);
    _mm256_store_si256(reinterpret_cast<__m256i*>(u), _mm256_castps_si256(x));
    for (int l = 0; l < 8; ++l)
      if (nan >> l & 1) r[l] = static_cast<uint16_t>((u[l] >> 16 & 0x8000u) | 0x7D00u);
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(r));
  }
  return h;
}
inline __m128i f2b8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                                   _mm256_set1_epi32(0x7FFF)));
  r = _mm256_srli_epi32(r, 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  // 32 -> 16 bits (every value < 2^16): packus works per 128-bit half; take the two low quarters
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
// a row's last n % 8 values go through an 8-value buffer (no access past the row)
template <class Cvt>
inline void half_to_f32(const uint16_t* s, float* d, int64_t n, Cvt cvt) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, cvt(s + i));
  if (i < n) {
    alignas(16) uint16_t t[8] = {};
    alignas(32) float o[8];
    std::memcpy(t, s + i, sizeof(uint16_t) * (n - i));
    _mm256_store_ps(o, cvt(t));
    std::memcpy(d + i, o, sizeof(float) * (n - i));
  }
}
template <class Cvt>
inline void f32_to_half(const float* s, uint16_t* d, int64_t n, Cvt cvt) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), cvt(_mm256_loadu_ps(s + i)));
  if (i < n) {
    alignas(32) float t[8] = {};
    alignas(16) uint16_t o[8];
    std::memcpy(t, s + i, sizeof(float) * (n - i));
    _mm_store_si128(reinterpret_cast<__m128i*>(o), cvt(_mm256_load_ps(t)));
    std::memcpy(d + i, o, sizeof(uint16_t) * (n - i));
  }
}
void h2f(const uint16_t* s, float* d, int64_t n) { half_to_f32(s, d, n, h2f8); }
void b2f(const uint16_t* s, float* d, int64_t n) { half_to_f32(s, d, n, b2f8); }
void f2h(const float* s, uint16_t* d, int64_t n) { f32_to_half(s, d, n, f2h8); }
void f2b(const float* s, uint16_t* d, int64_t n) { f32_to_half(s, d, n, f2b8); }
#define NA_HALF_ROWS h2f, b2f, f2h, f2b
#else
#define NA_HALF_ROWS nullptr, nullptr, nullptr, nullptr
#endif

}  // namespace

const KernelTable* NA_TABLE() {
  static const KernelTable table = [] {
    KernelTable t = {
#if defined(NA_VARIANT_avx512)
      "avx512",
#elif defined(NA_VARIANT_avx2)
      "avx2",
#elif defined(__aarch64__)
      "neon",
#else
      "baseline",
#endif
      VW, gemm, add_pad, dot, axpy, pack_kt, masked_max, masked_exp, masked_ds, all_finite, exact_fwd, transpose8, exact_bwd_q, exact_bwd_kv, exact_fwd2, exact_bwd_q2, transpose8_finite, row_bwd, row_fwd, row_fwd_g, exact_bwd_kv2, NA_FWD2R, NA_HALF_ROWS, row_sums, slot_dots, slot_axpys, full_softmax, full_p_ds};
#if defined(NA_VARIANT_avx512)
    // The 1D row backward and the gathered row forward take the AVX2 table's 8-wide kernels: a
    // query's slots go across the lanes after a lane reduction; at C1's K = 7 a 16-slot block is more
    // than half padding, and at this width reduce_lanes / bcast_max / bcast_sum are scalar loops
    // (benchmarks/RESULTS.md, eleventh pass: C1 fwd+bwd ~2x faster with these). row_fwd here serves
    // windows of up to 8 keys two queries to a vector (row_fwd_pair16), longer ones by the AVX2 kernel.
    const KernelTable* k8 = kernels_avx2();
    t.row_bwd = k8->row_bwd;
    t.row_fwd_g = k8->row_fwd_g;
#endif
    return t;
  }();
  return &table;
}

}  // namespace na
