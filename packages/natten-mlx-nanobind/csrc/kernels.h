// The arithmetic the tile drivers (driver.cpp) spend their time in: small dense GEMMs and softmax
// row helpers over float32. kernels.cpp is compiled once per instruction set (AVX-512, AVX2,
// baseline; NEON is the aarch64 baseline) and select_kernels() picks one at run time.
#pragma once

#include <cstdint>

namespace na {

// Where the exact backward's query side leaves P and dS of a block: slot x of key row r at pt / dst +
// r * ldr + x * lds (lane l at + l). own: a border block stores only the lanes it serves (its other
// lanes belong to other blocks writing the same buffer); otherwise every lane is stored (zero outside
// the lanes' windows).
struct SlotOut {
  float *pt, *dst;
  int64_t lds, ldr;
  bool own;
};

// One query of the 1D row kernels: its heads-last query and output-gradient rows, its first key and
// value rows, lse and its gradient, where dq goes (the forward: out) and its key/value accumulators
// (the forward: where lse goes).
// One query of one head for the row forwards: its row, its first key/value rows, where its output
// row and its lse go
struct RowQuery {
  const float *q, *k, *v;
  float *out, *lse;
};

// exact_fwd2r's P.V from value rows (a key's Dv features contiguous, Dv a multiple of 16): per key row r of
// block A's (B's) list, va[r] (vb[r]) is the value row of the key at the block's window start (coordinate ws
// along the last axis; the rows of the following keys vs floats apart); only keys j (relative to ws) with
// lo <= j < hi exist. Lane l's normalised output row goes to oa + l * os (ob: B's; null: no block B) and its
// lse to la + l * ls, for the lanes of serve (bit l).
struct RowPV {
  const float* const* va;
  const float* const* vb;
  int64_t vs;
  int lo, hi;
  float *oa, *ob;
  int64_t os;
  float *la, *lb;
  int64_t ls;
  unsigned serve;
  bool nt;  // output rows with non-temporal stores (whole 64-byte-aligned lines only)
};

struct KernelTable {
  const char* name;
  int vw;  // floats per vector register; callers pad the N of gemm to a multiple of it for speed
  // Row helpers marked "padded" process whole vectors: they may read up to round_up(n, vw) elements
  // of every operand and write there (unchanged values past n), so their buffers carry vw floats of
  // slack. The others touch exactly n elements.
  // C[M][N] (+)= A[M][K] . B[K][N], all row-major with leading dimensions lda, ldb, ldc.
  void (*gemm)(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool accumulate);
  void (*add_pad)(float* y, const float* x, int n);       // y += x (padded)
  float (*dot)(const float* a, const float* b, int n);
  void (*axpy)(float* y, float a, const float* x, int n);
  // KT[d][r * nk + x] = kT[d * ldk + tok[r] + x] for d < D, r < rows, x < nk (d2 == 1: contiguous
  // runs); writes whole vectors, so KT needs vw floats of slack and later columns are rewritten after
  void (*pack_kt)(float* KT, int64_t NP, const float* kT, int64_t ldk, const int64_t* tok, int64_t rows, int nk,
                  int64_t D);
  // Softmax pieces over a whole tile row of n columns (n a multiple of vw) under the window mask of
  // one query: column j is valid when always[j] (extra keys) or lo[a] <= c[a][j] < hi[a] on every axis.
  // masked_max: max of the valid s; masked_exp: p = valid ? exp(s - shift) : 0, returns the sum;
  // masked_ds: ds = valid ? p * (dp - c) : 0.
  float (*masked_max)(const float* s, const int* const* c, const int* always, const int* lo, const int* hi, int n);
  float (*masked_exp)(float* p, const float* s, const int* const* c, const int* always, const int* lo, const int* hi,
                      int n, float shift);
  void (*masked_ds)(float* ds, const float* p, const float* dp, float cst, const int* const* c, const int* always,
                    const int* lo, const int* hi, int n);
  // false when any of x[0..n) is inf or NaN
  bool (*all_finite)(const float* x, int64_t n);
  // Exact-window forward of vw consecutive queries (one per lane) whose windows along the last axis
  // start at consecutive keys: slot (r, x) of lane l is key rowbase[r] + x + l of kT [D][ldk] and
  // vT [Dv][ldv]; query l is column l of qT [D][ldq] (times scale). Writes oT [Dv][vw] (normalised)
  // and lse [vw]; s: (nrows * nx + D) * vw floats. lohi (null: every slot is in its lane's window): a border
  // block, whose lane l has slots lohi[l] <= x < lohi[vw + l] (a lane with none is not used). bias: rpb's
  // bias of the block's slots (null: none): slot x of key row r gets bias[r][x] on every lane (x < nx; slot x
  // of every lane is the same key - query offset along the last axis, the same rpb entry).
  void (*exact_fwd)(const float* qT, int64_t ldq, float scale, int64_t D, const float* kT, int64_t ldk,
                    const float* vT, int64_t ldv, int64_t Dv, const int64_t* rowbase, int nrows, int nx,
                    const int* lohi, float* s, float* oT, float* lse, const float* const* bias);
  // dst[c * ld + j] = src[j][c] for 8 tokens j and c < w
  void (*transpose8)(const float* const* src, int64_t w, float* dst, int64_t ld);
  // Backward of the exact-window path (kernels.cpp says how): the query side (P, dS and dQ of vw
  // consecutive queries, P and dS to a SlotOut; s: 2 * nrows * nx * vw floats; dlse: the lanes' lse
  // gradients; dQ times dqscale; bias: as exact_fwd's) and the key side (dK or dV of the keys the queries'
  // slots reach).
  void (*exact_bwd_q)(const float* qs, int64_t ldq, int64_t D, const float* kT, int64_t ldk, const float* vT,
                      int64_t ldv, int64_t Dv, const float* dO, int64_t ldo, const float* lse, const float* dlse,
                      const int64_t* rowbase, int nrows, int nx, const int* lohi, float* s, const SlotOut& o,
                      float* dqT, float dqscale, const float* const* bias);
  void (*exact_bwd_kv)(const float* w, int64_t lds, int64_t ldr, const float* x, int64_t ldx, int64_t W, float* accT,
                       int64_t lda, const int64_t* rowbase, int nrows, int nx, int nk, const int* vr);
  // exact_fwd of two blocks (A, B) at the same lanes of two query rows, key row bases ra[na] and
  // rb[nb] (each ascending), one lohi for both: key rows in both windows are read once for both.
  // qa, qb: [D][ldq]; sa: (na * nx + 2 * D) * vw floats, sb: nb * nx * vw; oa, ob [Dv][vw]; biasa / biasb: each
  // block's exact_fwd bias (both null, or both set where nb > 0).
  void (*exact_fwd2)(const float* qa, const float* qb, int64_t ldq, float scale, int64_t D, const float* kT,
                     int64_t ldk, const float* vT, int64_t ldv, int64_t Dv, const int64_t* ra, int na,
                     const int64_t* rb, int nb, int nx, const int* lohi, float* sa, float* sb, float* oa, float* ob,
                     float* lsea, float* lseb, const float* const* biasa, const float* const* biasb);
  // exact_bwd_q of two blocks at the same lanes of two query rows (as exact_fwd2): qa/qb [D][ldq], doa/dob
  // [Dv][ldo], sa: 2 * na * nx * vw floats, sb: 2 * nb * nx * vw; P and dS to outa/outb; dqa/dqb [D][vw]; biasa /
  // biasb as exact_fwd2's
  void (*exact_bwd_q2)(const float* qa, const float* qb, int64_t ldq, int64_t D, const float* kT, int64_t ldk,
                       const float* vT, int64_t ldv, int64_t Dv, const float* doa, const float* dob, int64_t ldo,
                       const float* lsea, const float* lseb, const float* dlsea, const float* dlseb, const int64_t* ra,
                       int na, const int64_t* rb, int nb, int nx, const int* lohi, float* sa, float* sb,
                       const SlotOut& outa, const SlotOut& outb, float* dqa, float* dqb, float dqscale,
                       const float* const* biasa, const float* const* biasb);
  // transpose8 that also returns false when any value it read is inf or NaN
  bool (*transpose8_finite)(const float* const* src, int64_t w, float* dst, int64_t ld);
  // 1D backward of one query of one head straight from/to heads-last rows (kernels.cpp says how)
  void (*row_bwd)(const float* q, const float* dO, const float* k, int64_t kstep, const float* v, int64_t vstep, int n,
                  int64_t D, int64_t Dv, float scale, float lse, float dlse, const float* zeros, float* s, float* dq,
                  float* acc, int64_t rw, int rmask, int r0);
  // its forward of nq queries (RowQuery: output row to out, lse to *lse)
  void (*row_fwd)(const RowQuery* qs, int nq, int64_t kstep, int64_t vstep, int n, int64_t D, int64_t Dv, float scale,
                  const float* zeros, float* s);
  // row_fwd over n keys/values at k + koff[x] * kstep / v + koff[x] * vstep (2D/3D windows: several
  // last-axis segments, koff their tokens)
  void (*row_fwd_g)(const RowQuery* qs, int nq, const int64_t* koff, int64_t kstep, int64_t vstep, int n, int64_t D,
                    int64_t Dv, float scale, const float* zeros, float* s);
  // exact_bwd_kv of key rows given by their weight rows w0[r] (d = 0 at row start, slots lds apart),
  // summed from one or two sources (two query rows' P or dS and queries or output gradients): with w1,
  // key row r gets source 0's sums then source 1's in one pass (its accumulators loaded and stored once;
  // the same additions in the same order as two exact_bwd_kv calls)
  void (*exact_bwd_kv2)(const float* const* w0, const float* const* w1, int64_t lds, const float* x0, const float* x1,
                        int64_t ldx, int64_t W, float* accT, int64_t lda, const int64_t* rowbase, int nrows, int nx,
                        int nk, const int* vr);
  // exact_fwd2 (nb may be 0: block A alone) with its P.V from value rows and its outputs and lse written as
  // rows (RowPV): no transposed values, none finite required (no weight of a slot outside a lane's window
  // multiplies a value), bitwise the same results. AVX-512 only (null elsewhere); Dv a multiple of 16.
  void (*exact_fwd2r)(const float* qa, const float* qb, int64_t ldq, float scale, int64_t D, const float* kT,
                      int64_t ldk, int64_t Dv, const int64_t* ra, int na, const int64_t* rb, int nb, int nx,
                      const int* lohi, float* sa, float* sb, const RowPV& rp, const float* const* biasa,
                      const float* const* biasb);
  // n float16 / bfloat16 values (as uint16_t bits) to float32 and back, bitwise as MLX's own CPU
  // conversions (kernels.cpp says how); null on tables without F16C, where the boundary converts
  // through MLX's types
  void (*h2f)(const uint16_t* src, float* dst, int64_t n);
  void (*b2f)(const uint16_t* src, float* dst, int64_t n);
  void (*f2h)(const float* src, uint16_t* dst, int64_t n);
  void (*f2b)(const float* src, uint16_t* dst, int64_t n);
  // The rpb gradient's sums of the 2D/3D exact backward: for r < nrows and d < nd, the nv vectors of row
  // x + r * ldr + d * lds added into the vector at acc[r * nd + d] (its first vw floats)
  void (*row_sums)(const float* x, int64_t ldr, int64_t lds, int nrows, int nd, int nv, float* const* acc);
  // the split ops' query rows (qk_forward / av_forward): out[s] = scale * (q . rows[s]) over n features for s < ns
  // (rows[s] null: -inf); y = sum over s of w[s] * rows[s] over n features (rows[s] null: skipped; y overwritten)
  void (*slot_dots)(const float* q, const float* const* rows, int ns, int n, float scale, float* out);
  void (*slot_axpys)(const float* w, const float* const* rows, int ns, int n, float* y);
  // masked_max + masked_exp / masked_exp + masked_ds for tile rows whose queries' windows are the whole box:
  // columns [0, ncol) valid, the padding up to n not. full_softmax: rows rows ld apart, P = exp(S - m),
  // lse[r] = m + log(sum), inv[r] = 1 / sum; full_p_ds: one row, p = exp(s - shift), ds = p * (dp - c) with
  // c = sum p * dp - dlse
  void (*full_softmax)(float* P, const float* S, int64_t ld, int rows, int n, int ncol, float* lse, float* inv);
  void (*full_p_ds)(float* p, float* ds, const float* s, const float* dp, int n, int ncol, float shift, float dlse);
};

const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_base();

// The AVX-512 border blocks' scores by valignd + vpermps (perm_scores2a) instead of vpermt2ps:
// set by select_kernels() (driver.cpp), read by the kernels
extern bool perm_al;

// The best table this CPU runs (NATTEN_MLX_SIMD=avx512|avx2|base overrides, for tests and benches).
const KernelTable& select_kernels();

}  // namespace na
