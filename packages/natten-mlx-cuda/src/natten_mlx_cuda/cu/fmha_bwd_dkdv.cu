// Fused neighborhood attention backward, key side, on the tensor cores (float16/bfloat16).
// One block of 4 warps per (key tile, kv head, batch): the key tile is a box of KT0 x KT1 x KT2 = 64
// in-group key coordinates of one dilation group per axis, over the local key slab. The queries
// whose windows meet it are one range per axis (na_query_begin/end of tiling.h, cut to the local
// query slab), walked in query tiles of QT0 x QT1 x QT2 = 64 for every query head of this kv head,
// Q, dO, lse and delta double-buffered in shared memory. Per warp (16 key rows):
// S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
// dK += dS^T Q (mma.sync m16n8k16). Absent queries carry lse = +inf, so they contribute nothing.
// Inputs as fmha_bwd_dq; outputs d_key [B, NK, HKV, D], d_value [B, NK, HKV, DV], float32.
// Template: T, D, DV, DP, DVP, QT0..2, KT0..2, HAS_RPB, LDSM (B fragments through ldmatrix). prm's per-axis tile count is over the keys.
//
// The walk's geometry lives in shared memory, not in the loop: the query tiles' classes, check bits,
// extents and first query rows are tabulated once per block (one tile per thread, up to NA_TT tiles a
// table; a longer walk goes table by table, every head of the group through one table before the
// next is built), each tile row's offset from the tile's first query and each key row's query range
// once per block; per tile a thread only reads the table (no window arithmetic, no division, no
// 64-bit multiplication per 16-byte chunk), and the per-element mask of a tile is one 64-bit word per
// key row (bit u: query u of the tile has the row's key in its window).
#ifndef NA_BLOCK_SHARED
#ifdef NA_EMU
#define NA_BLOCK_SHARED static  // the emulator runs one block at a time: a function static is the block's
#else
#define NA_BLOCK_SHARED __shared__
#endif
#endif
constexpr int BQ = QT0 * QT1 * QT2;
constexpr int BK = KT0 * KT1 * KT2;
static_assert(BQ == 64 && BK == 64, "tiles of 64 queries and 64 keys");
constexpr int QS = DP + 8;
constexpr int VS = DVP + 8;
constexpr int DCH = D / 8, DVCH = DV / 8;
#ifndef NA_BWD_TABLE
#define NA_BWD_TABLE 128  // tests/cuda/test_emulated_walk.py defines a small one to reach the rebuilds
#endif
constexpr int NA_TT = NA_BWD_TABLE;  // tile table entries, one per thread (at most 128)
static_assert(NA_TT >= 1 && NA_TT <= 128, "one table entry per thread");
constexpr int NHALF = DP + DVP > 192 ? 4 : (DP + DVP > 128 ? 2 : 1);  // parts of the query tile per pass (see the loop)
constexpr int JQ = 8 / NHALF;                   // 8-query subtiles per part
const int QT[3] = {QT0, QT1, QT2};
const int KT[3] = {KT0, KT1, KT2};

const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int hk = blockIdx.y, b = blockIdx.z;
const int G = H / HKV;
const float scale = scl[0];
const float scale_log2 = scale * NA_LOG2E;
const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;

NaAxis ax[3];
int g[3], k0[3], k1[3], Lg[3], qb[3], qe[3], nqt[3];
bool none = false;
{
  for (int a = 0; a < 3; ++a) ax[a] = na_axis(prm, a);
  bool empty = false;
  for (int a = 0; a < 3; ++a) {
    // the block's key tile over the local key slab: tiling.h's decode (as the query tiles elsewhere)
    const int u = na_tile_digit(blockIdx.x, ax[1].d * ax[1].qtiles, ax[2].d * ax[2].qtiles, a);
    g[a] = na_tile_group(u, ax[a].qtiles);
    k0[a] = na_tile_first(u, ax[a].qtiles, ax[a].kvoff, ax[a].d, KT[a]);
    k1[a] = na_tile_last(u, ax[a].qtiles, ax[a].kvoff, ax[a].nk, ax[a].d, KT[a]) + 1;
    empty = empty || k1[a] <= k0[a];
    Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
    qb[a] = na_max(na_query_begin(k0[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal), na_group_first(ax[a].qoff, ax[a].d, g[a]));
    qe[a] = na_min(na_query_end(k1[a] - 1, Lg[a], ax[a].K, ax[a].s, ax[a].causal), na_group_end(ax[a].qoff, ax[a].n, ax[a].d, g[a]));
    none = none || qe[a] <= qb[a];
    nqt[a] = na_key_tiles(qb[a], qe[a], QT[a]);
  }
  if (empty) return;
}
const int nq = none ? 0 : nqt[0] * nqt[1] * nqt[2];

// The block's geometry, for what runs inside the walk (table builds) and after it: read back from
// shared memory there, so that none of it stays in registers across the loop.
enum { GK, GS, GC, GD, GG, GN, GQOFF, GLG, GQB, GQE, GK0, GK1, GNQT, GNK, GKVOFF, GFIELDS };
NA_BLOCK_SHARED int gsh[3][GFIELDS];
if (tid == 0)
  for (int a = 0; a < 3; ++a) {
    const int v[GFIELDS] = {ax[a].K, ax[a].s, ax[a].causal, ax[a].d, g[a], ax[a].n, ax[a].qoff, Lg[a], qb[a], qe[a],
                            k0[a], k1[a], nqt[a], ax[a].nk, ax[a].kvoff};
    for (int f = 0; f < GFIELDS; ++f) gsh[a][f] = v[f];
  }

// this thread's key rows r = warp * 16 + gid (+ 8): their key row index (token * HKV + head)
auto key_row = [&](int rr, bool& ok) -> long long {
  const int r = warp * 16 + gid + rr * 8;
  const int u[3] = {r / (KT1 * KT2), (r / KT2) % KT1, r % KT2};
  ok = true;
  long long flat = 0;
  for (int a = 0; a < 3; ++a) {
    const int* x = gsh[a];
    const int kc = x[GK0] + u[a];
    ok = ok && kc < x[GK1];
    flat = flat * x[GNK] + (kc * x[GD] + x[GG] - x[GKVOFF]);
  }
  return ((long long)b * NK + flat) * HKV + hk;
};

NA_SHARED_DECL;
T* Ks = reinterpret_cast<T*>(na_smem);
T* Vs = Ks + BK * QS;
T* Qs = Vs + BK * VS;       // 2 buffers
T* Os = Qs + 2 * BQ * QS;   // 2 buffers of d_out
float* Ls = reinterpret_cast<float*>(Os + 2 * BQ * VS);  // 2 x 64 lse * log2(e)
float* Ds = Ls + 2 * BQ;                                  // 2 x 64 delta
{
  uint4* z = reinterpret_cast<uint4*>(na_smem);
  const int nz = (int)(((BK * QS + BK * VS + 2 * BQ * QS + 2 * BQ * VS) * sizeof(T) + 4 * BQ * sizeof(float)) / 16);
  for (int i = tid; i < nz; i += 128) z[i] = make_uint4(0u, 0u, 0u, 0u);
}
__syncthreads();

NA_BLOCK_SHARED long long tb_row[NA_TT];            // query row (token * H) of the tile's first query, head 0
NA_BLOCK_SHARED unsigned long long tb_in[NA_TT];    // bit u: query u of the tile lies inside the query range
NA_BLOCK_SHARED int tb_info[NA_TT];                 // class | check bits << 2 | axis a's extent << (8 + 8a)
NA_BLOCK_SHARED int tb_cr[3][NA_TT];                // the tile's first query - qb, per axis
NA_BLOCK_SHARED int row_t[BQ];                      // tokens from the tile's first query to its query u
// per axis a and x in [0, QT[a]]: the tile's queries whose coordinate along a is below x (a query
// tile's queries in [lo, hi) along a are pm[hi] & ~pm[lo], clamped: two shared loads instead of shifts
// and selects)
constexpr int PM1 = QT0 + 1, PM2 = QT0 + QT1 + 2;
NA_BLOCK_SHARED unsigned long long pm[QT0 + QT1 + QT2 + 3];
NA_BLOCK_SHARED int qwin[2][3][BK];                 // key row's queries [lo, hi) per axis, relative to qb
NA_BLOCK_SHARED int rpb_col[BQ];                    // query u's part of the rpb index

auto low_bits = [](int n) -> unsigned long long { return n <= 0 ? 0ull : (n >= 64 ? ~0ull : (1ull << n) - 1ull); };
// bits u of a query tile whose coordinate along axis a lies in [lo, hi)
auto axis_bits = [&](int a, int lo, int hi) -> unsigned long long {
  const int ta = a == 0 ? QT0 : (a == 1 ? QT1 : QT2);
  const int in = a == 0 ? QT1 * QT2 : (a == 1 ? QT2 : 1);
  unsigned long long rep = 0;  // one bit per period of ta * in bits (a constant once a is)
  for (int p = 0; p < 64; p += ta * in) rep |= 1ull << p;
  lo = na_max(lo, 0);
  hi = na_min(hi, ta);
  return hi > lo ? (low_bits(hi * in) & ~low_bits(lo * in)) * rep : 0ull;
};

// the tile table's entry of query tile first + tid
int tb_first = 0;
auto build = [&](int first) {
  __syncthreads();  // nobody reads the old table any more
  tb_first = first;
  const int lin = first + tid;
  if (tid < NA_TT && lin < nq) {
    int t[3];
    t[2] = lin % gsh[2][GNQT];
    t[1] = (lin / gsh[2][GNQT]) % gsh[1][GNQT];
    t[0] = lin / (gsh[2][GNQT] * gsh[1][GNQT]);
    int cls = NA_TILE_FULL, info = 0;
    unsigned long long in = ~0ull;
    long long flat = 0;
    for (int a = 0; a < 3; ++a) {
      const int* x = gsh[a];
      const int c0 = x[GQB] + t[a] * QT[a], c1 = na_min(c0 + QT[a], x[GQE]) - 1;
      const int ca = na_tile_class(c0, c1, x[GK0], x[GK1], x[GLG], x[GK], x[GS], x[GC] != 0);
      cls = na_min(cls, ca);
      info |= (ca == NA_TILE_PARTIAL ? 4 << a : 0) | (c1 - c0 + 1) << (8 + 8 * a);
      in &= axis_bits(a, 0, c1 - c0 + 1);
      flat = flat * x[GN] + (c0 * x[GD] + x[GG] - x[GQOFF]);
      tb_cr[a][tid] = c0 - x[GQB];
    }
    tb_info[tid] = info | cls;
    tb_in[tid] = in;
    tb_row[tid] = ((long long)b * N + flat) * H;
  }
  __syncthreads();
};
// the first (head, query tile) at or after (hh, lin) in walk order that is not skipped; hh = G when
// none is left. Order: table by table, within one every head, within a head the table's tiles.
auto advance = [&](int& hh, int& lin) {
  while (hh < G) {
    if (lin >= nq || lin >= tb_first + NA_TT) {
      if (hh + 1 < G) {
        ++hh;
        lin = tb_first;
      } else if (tb_first + NA_TT < nq) {
        hh = 0;
        build(tb_first + NA_TT);
        lin = tb_first;
      } else {
        hh = G;
      }
      continue;
    }
    if ((tb_info[lin - tb_first] & 3) != NA_TILE_SKIP) return;
    ++lin;
  }
};

if (tid < QT0 + QT1 + QT2 + 3) {
  const int a = tid < PM1 ? 0 : (tid < PM2 ? 1 : 2);
  pm[tid] = axis_bits(a, 0, tid - (a == 0 ? 0 : (a == 1 ? PM1 : PM2)));
}
if (tid < BQ) {
  const int u0 = tid / (QT1 * QT2), u1 = (tid / QT2) % QT1, u2 = tid % QT2;
  row_t[tid] = (u0 * ax[0].d * ax[1].n + u1 * ax[1].d) * ax[2].n + u2 * ax[2].d;
  if (HAS_RPB) rpb_col[tid] = -((u0 * (2 * ax[1].K - 1) + u1) * (2 * ax[2].K - 1) + u2);
} else if (tid < BQ + BK) {
  const int r = tid - BQ;
  const int u[3] = {r / (KT1 * KT2), (r / KT2) % KT1, r % KT2};
  for (int a = 0; a < 3; ++a) {
    const int kc = k0[a] + u[a];
    qwin[0][a][r] = na_query_begin(kc, Lg[a], ax[a].K, ax[a].s, ax[a].causal) - qb[a];
    qwin[1][a][r] = na_query_end(kc, Lg[a], ax[a].K, ax[a].s, ax[a].causal) - qb[a];
  }
}
int rpb_row[2];  // the key row's part of the rpb index, for the query qb
if (HAS_RPB)
  for (int rr = 0; rr < 2; ++rr) {
    const int r = warp * 16 + gid + rr * 8;
    const int u[3] = {r / (KT1 * KT2), (r / KT2) % KT1, r % KT2};
    rpb_row[rr] = 0;
    for (int a = 0; a < 3; ++a) rpb_row[rr] = rpb_row[rr] * (2 * ax[a].K - 1) + k0[a] + u[a] - qb[a] + ax[a].K - 1;
  }

// query tile (table entry e) of head hh -> buffer buf (na_load_rows, common.cuh). lse and delta go
// through registers (ll, dd) and are stored by store_ld after the tile in flight has been used, so their loads overlap the current tile's work.
const unsigned query_tok = H * D * (unsigned)sizeof(T), out_tok = H * DV * (unsigned)sizeof(T);  // bytes per token
float ll = 0.f, dd = 0.f;
auto load_q = [&](int e, int hh, int buf) {
  const unsigned long long in = tb_in[e];
  const long long row = tb_row[e] + hk * G + hh;
  // a tile inside the query range on every axis (most of them) takes the loop without row checks
  // (not with rpb: at D = 128 the second copy of the loop costs spills there)
  if (!HAS_RPB && in == ~0ull) {
    na_load_rows<BQ, DCH, true>(tid, row_t, in, query + row * D, query_tok, Qs + buf * BQ * QS, QS);
    na_load_rows<BQ, DVCH, true>(tid, row_t, in, d_out + row * DV, out_tok, Os + buf * BQ * VS, VS);
  } else {
    na_load_rows<BQ, DCH>(tid, row_t, in, query + row * D, query_tok, Qs + buf * BQ * QS, QS);
    na_load_rows<BQ, DVCH>(tid, row_t, in, d_out + row * DV, out_tok, Os + buf * BQ * VS, VS);
  }
  if (tid < BQ) {
    const bool ok = (in >> tid) & 1ull;
    const long long q = row + (long long)row_t[tid] * H;
    ll = ok ? lse[q] * NA_LOG2E : -NA_NEG_INF;
    dd = ok ? delta[q] : 0.f;
  }
};
auto store_ld = [&](int buf) {
  if (tid < BQ) {
    Ls[buf * BQ + tid] = ll;
    Ds[buf * BQ + tid] = dd;
  }
};

// the key tile, once
for (int i = tid; i < BK * (DCH + DVCH); i += 128) {
  const bool is_k = i < BK * DCH;
  const int j = is_k ? i : i - BK * DCH;
  const int ch_n = is_k ? DCH : DVCH;
  const int r = j / ch_n, ch = j % ch_n;
  const int u2 = r % KT2, u1 = (r / KT2) % KT1, u0 = r / (KT1 * KT2);
  const int a0 = k0[0] + u0, a1 = k0[1] + u1, a2 = k0[2] + u2;
  const bool ok = a0 < k1[0] && a1 < k1[1] && a2 < k1[2];
  const long long flat = ((long long)(a0 * ax[0].d + g[0] - ax[0].kvoff) * ax[1].nk + (a1 * ax[1].d + g[1] - ax[1].kvoff)) * ax[2].nk +
                         (a2 * ax[2].d + g[2] - ax[2].kvoff);
  const long long row = ((long long)b * NK + flat) * HKV + hk;
  if (is_k)
    na_cp_async16(Ks + r * QS + ch * 8, ok ? (const void*)(key + row * D + ch * 8) : (const void*)key, ok);
  else
    na_cp_async16(Vs + r * VS + ch * 8, ok ? (const void*)(value + row * DV + ch * 8) : (const void*)value, ok);
}
build(0);  // its first barrier orders the row tables before any use
int hh = 0, lin = 0;
advance(hh, lin);
if (hh < G) {
  load_q(lin - tb_first, hh, 0);
  store_ld(0);
}
na_cp_commit();
na_cp_wait_all();
__syncthreads();

// K and V stay in shared memory; their A fragments are read per use (registers hold dK and dV)
const unsigned short* ks = reinterpret_cast<const unsigned short*>(Ks);
const unsigned short* vs = reinterpret_cast<const unsigned short*>(Vs);
float dk[DP / 8][4], dv[DVP / 8][4];
#pragma unroll
for (int jn = 0; jn < DP / 8; ++jn)
#pragma unroll
  for (int e = 0; e < 4; ++e) dk[jn][e] = 0.f;
#pragma unroll
for (int jn = 0; jn < DVP / 8; ++jn)
#pragma unroll
  for (int e = 0; e < 4; ++e) dv[jn][e] = 0.f;
const int R = prm[NA_P_RPB];

int buf = 0;
while (hh < G) {
  // the current tile's entry, read before the walk may rebuild the table
  const int ce = lin - tb_first;
  const int info = tb_info[ce];
  const bool part = (info & 3) == NA_TILE_PARTIAL;
  const T* rpb_h = rpb + (long long)(hk * G + hh) * R;
  // per key row, bit u: query u of the tile has the row's key in its window (msk), and is inside the
  // query range (bsk: where rpb may be read)
  unsigned long long msk[2], bsk[2];
  int rpb_t = 0;  // the tile's part of the rpb index
  {
    const unsigned long long in = HAS_RPB ? tb_in[ce] : ~0ull;
    int cr[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) cr[a] = tb_cr[a][ce];
    msk[0] = msk[1] = ~0ull;
    if (part) {
      const int* w = &qwin[0][0][warp * 16 + gid];  // this thread's first key row; the second 8 rows on
#pragma unroll
      for (int a = 0; a < 3; ++a)
        if (info & (4 << a)) {
          const unsigned long long* p = pm + (a == 0 ? 0 : (a == 1 ? PM1 : PM2));
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const int lo = na_min(na_max(w[a * BK + rr * 8] - cr[a], 0), QT[a]);
            const int hi = na_min(na_max(w[(3 + a) * BK + rr * 8] - cr[a], 0), QT[a]);
            msk[rr] &= p[hi] & ~p[lo];
          }
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      msk[rr] >>= 2 * tig;  // bit j * 8 + i: column j * 8 + 2 tig + i
      bsk[rr] = (msk[rr] & (in >> (2 * tig)));
    }
    if (HAS_RPB)
#pragma unroll
      for (int a = 0; a < 3; ++a) rpb_t = rpb_t * (2 * gsh[a][GK] - 1) - cr[a];
  }
  int nh = hh, nl = lin + 1;
  advance(nh, nl);
  if (nh < G) load_q(nl - tb_first, nh, buf ^ 1);
  na_cp_commit();
  na_cp_wait_one();
  __syncthreads();

  const unsigned short* qbuf = reinterpret_cast<const unsigned short*>(Qs + buf * BQ * QS);
  const unsigned short* obuf = reinterpret_cast<const unsigned short*>(Os + buf * BQ * VS);
  const float* lbuf = Ls + buf * BQ;
  const float* dbuf = Ds + buf * BQ;

  // large head dims take the tile's 64 queries in NHALF parts: S^T, dP^T and P^T of one part live
  // at a time (the whole tile's spilled at D = 128 beside dK and dV); K and V fragments are read per part
#pragma unroll
  for (int hf = 0; hf < NHALF; ++hf) {
    float s[JQ][4], dp[JQ][4];
#pragma unroll
    for (int j = 0; j < JQ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = 0.f;
        dp[j][e] = 0.f;
      }
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      unsigned af[4];
      na_frag_a<LDSM>(af, ks, QS, warp * 16, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < JQ; j += 2) {
        unsigned bf[4];
        na_frag_b_nk<LDSM>(bf, qbuf, QS, (hf * JQ + j) * 8, kk * 16, lane);
        na_mma<T>(s[j], af, bf);
        na_mma<T>(s[j + 1], af, bf + 2);
      }
    }
#pragma unroll
    for (int kk = 0; kk < DVP / 16; ++kk) {
      unsigned af[4];
      na_frag_a<LDSM>(af, vs, VS, warp * 16, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < JQ; j += 2) {
        unsigned bf[4];
        na_frag_b_nk<LDSM>(bf, obuf, VS, (hf * JQ + j) * 8, kk * 16, lane);
        na_mma<T>(dp[j], af, bf);
        na_mma<T>(dp[j + 1], af, bf + 2);
      }
    }
    // P^T and dS^T as packed A fragments right away (halves the live registers before the two mma loops)
    unsigned pf[JQ / 2][4], sf[JQ / 2][4];
#pragma unroll
    for (int j = 0; j < JQ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1;
        const int bit = (hf * JQ + j) * 8 + (e & 1);  // query column bit - 2 tig
        const int col = bit + tig * 2;
        float x = s[j][e] * scale_log2;
        const bool ok = (HAS_RPB || part) ? ((msk[rr] >> bit) & 1ull) != 0ull : true;
        if (HAS_RPB && ((bsk[rr] >> bit) & 1ull))
          x += na_f(rpb_h[rpb_row[rr] + rpb_t + rpb_col[col]]) * NA_LOG2E;
        const float p = ok ? na_exp2(x - lbuf[col]) : 0.f;
        s[j][e] = p;
        dp[j][e] = p * (dp[j][e] - dbuf[col]);
        if (e & 1) {  // A fragment register of (query subtile pair j / 2, rows rr, queries j % 2)
          pf[j >> 1][(j & 1) * 2 + rr] = NaType<T>::pack2(s[j][e - 1], s[j][e]);
          sf[j >> 1][(j & 1) * 2 + rr] = NaType<T>::pack2(dp[j][e - 1], dp[j][e]);
        }
      }
#pragma unroll
    for (int kk = 0; kk < JQ / 2; ++kk) {
#pragma unroll
      for (int jn = 0; jn < DVP / 8; jn += 2) {
        unsigned bf[4];
        na_frag_b_kn<LDSM>(bf, obuf, VS, (hf * JQ / 2 + kk) * 16, jn * 8, lane);
        na_mma<T>(dv[jn], pf[kk], bf);
        na_mma<T>(dv[jn + 1], pf[kk], bf + 2);
      }
#pragma unroll
      for (int jn = 0; jn < DP / 8; jn += 2) {
        unsigned bf[4];
        na_frag_b_kn<LDSM>(bf, qbuf, QS, (hf * JQ / 2 + kk) * 16, jn * 8, lane);
        na_mma<T>(dk[jn], sf[kk], bf);
        na_mma<T>(dk[jn + 1], sf[kk], bf + 2);
      }
    }
  }
  if (nh < G) store_ld(buf ^ 1);  // buffer buf ^ 1 was last read in the previous iteration
  __syncthreads();
  hh = nh;
  lin = nl;
  buf ^= 1;
}

for (int rr = 0; rr < 2; ++rr) {
  bool ok;
  const long long krow = key_row(rr, ok);
  if (!ok) continue;
#pragma unroll
  for (int jn = 0; jn < DP / 8; ++jn) {
    const int col = jn * 8 + tig * 2;
    if (col < D) {
      d_key[krow * D + col] = dk[jn][2 * rr] * scale;
      d_key[krow * D + col + 1] = dk[jn][2 * rr + 1] * scale;
    }
  }
#pragma unroll
  for (int jn = 0; jn < DVP / 8; ++jn) {
    const int col = jn * 8 + tig * 2;
    if (col < DV) {
      d_value[krow * DV + col] = dv[jn][2 * rr];
      d_value[krow * DV + col + 1] = dv[jn][2 * rr + 1];
    }
  }
}
