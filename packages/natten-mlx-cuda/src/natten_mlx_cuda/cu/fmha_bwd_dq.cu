// Fused neighborhood attention backward, query side, on the tensor cores (float16/bfloat16): the
// forward's walk (query tile box, its key range in key tiles, double-buffered through cp.async).
// Per warp (16 query rows) and key tile: S = Q K^T, P = exp(S - lse), dP = dO V^T,
// dS = P (dP - delta), dQ += dS K (mma.sync m16n8k16); d_rpb += dS by float32 atomics when HAS_RPB.
// Inputs query [B, N, H, D], key [B, NK, HKV, D], value [B, NK, HKV, DV], d_out [B, N, H, DV],
// lse and delta [B, N, H] float32 (delta = rowsum(d_out * out) - d_lse), rpb, prm, scl.
// Outputs d_query [B, N, H, D] float32 (scaled), d_rpb [H, prod(2K-1)] float32 (zero-initialised).
// Template: T, D, DV, DP, DVP, QT0..2, KT0..2, HAS_RPB, LDSM (B fragments through ldmatrix), SRPB
// (d_rpb is summed per block in shared memory after the tiles, plan.BWD_SRPB floats at most, and added
// to the output once per entry at the end: with small tables every block's atomics otherwise meet on
// the same few hundred addresses in L2).
//
// The walk's geometry lives in shared memory, not in the loop: the key tiles' classes, check bits,
// extents and first key rows are tabulated once per block (one tile per thread, up to NA_TT tiles a
// table, rebuilt when the walk leaves it), each tile row's offset from the tile's first key and each
// query row's window once per block; per tile a thread only reads the table (no window arithmetic,
// no division, no 64-bit multiplication per 16-byte chunk), and the per-element mask of a tile is
// one 64-bit word per row (bit u: key u of the tile is in the row's window).
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
const int QT[3] = {QT0, QT1, QT2};
const int KT[3] = {KT0, KT1, KT2};

const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int h = blockIdx.y, b = blockIdx.z;
const int hk = h / (H / HKV);
const float scale = scl[0];
const float scale_log2 = scale * NA_LOG2E;

NaAxis ax[3];
int g[3], c0[3], c1[3], Lg[3], kb[3], ke[3], nkt[3];
{
  for (int a = 0; a < 3; ++a) ax[a] = na_axis(prm, a);
  bool empty = false;
  for (int a = 0; a < 3; ++a) {
    // the block's query tile: tiling.h's decode, shared with the forward and the Metal kernels
    const int u = na_tile_digit(blockIdx.x, ax[1].d * ax[1].qtiles, ax[2].d * ax[2].qtiles, a);
    g[a] = na_tile_group(u, ax[a].qtiles);
    c0[a] = na_tile_first(u, ax[a].qtiles, ax[a].qoff, ax[a].d, QT[a]);
    c1[a] = na_tile_last(u, ax[a].qtiles, ax[a].qoff, ax[a].n, ax[a].d, QT[a]);
    empty = empty || c1[a] < c0[a];
    Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
    kb[a] = na_tile_key_begin(c0[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    ke[a] = na_tile_key_end(c1[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    nkt[a] = na_key_tiles(kb[a], ke[a], KT[a]);
  }
  if (empty) return;
}
const int ntiles = nkt[0] * nkt[1] * nkt[2];

// The block's geometry, for what runs inside the walk (table builds) and after it: read back from
// shared memory there, so that none of it stays in registers across the loop.
enum { GK, GS, GC, GD, GG, GN, GQOFF, GLG, GC0, GC1, GKB, GKE, GNKT, GNK, GKVOFF, GFIELDS };
NA_BLOCK_SHARED int gsh[3][GFIELDS];

NA_SHARED_DECL;
T* Qs = reinterpret_cast<T*>(na_smem);
T* Os = Qs + BQ * QS;  // d_out tile
T* Ks = Os + BQ * VS;
T* Vs = Ks + 2 * BK * QS;
const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
float* srpb = reinterpret_cast<float*>(Vs + 2 * BK * VS);  // SRPB: prm[NA_P_RPB] floats
{
  uint4* z = reinterpret_cast<uint4*>(na_smem);
  const int nz = (int)((BQ * QS + BQ * VS + 2 * BK * QS + 2 * BK * VS) * sizeof(T) / 16);
  for (int i = tid; i < nz; i += 128) z[i] = make_uint4(0u, 0u, 0u, 0u);
  if (SRPB)
    for (int i = tid; i < prm[NA_P_RPB]; i += 128) srpb[i] = 0.f;
}
__syncthreads();

if (tid == 0)
  for (int a = 0; a < 3; ++a) {
    const int v[GFIELDS] = {ax[a].K, ax[a].s, ax[a].causal, ax[a].d, g[a], ax[a].n, ax[a].qoff, Lg[a], c0[a], c1[a],
                            kb[a], ke[a], nkt[a], ax[a].nk, ax[a].kvoff};
    for (int f = 0; f < GFIELDS; ++f) gsh[a][f] = v[f];
  }

NA_BLOCK_SHARED long long tb_row[NA_TT];           // key row (token * HKV + head) of the tile's first key
NA_BLOCK_SHARED unsigned long long tb_in[NA_TT];   // bit u: key u of the tile lies inside the key range
NA_BLOCK_SHARED int tb_info[NA_TT];                // class | check bits << 2 | axis a's extent << (8 + 8a)
NA_BLOCK_SHARED int tb_kr[3][NA_TT];               // the tile's first key - kb, per axis
NA_BLOCK_SHARED int row_t[BK];                     // tokens from the tile's first key to its key u
// per axis a and x in [0, KT[a]]: the tile's keys whose coordinate along a is below x (a key tile's
// keys in [lo, hi) along a are pm[hi] & ~pm[lo], clamped: two shared loads instead of shifts and selects)
constexpr int PM1 = KT0 + 1, PM2 = KT0 + KT1 + 2;
NA_BLOCK_SHARED unsigned long long pm[KT0 + KT1 + KT2 + 3];
NA_BLOCK_SHARED int win[2][3][BQ];                 // query row's window [lo, hi) per axis, relative to kb
NA_BLOCK_SHARED int rpb_col[BK];                   // key u's part of the rpb index

auto low_bits = [](int n) -> unsigned long long { return n <= 0 ? 0ull : (n >= 64 ? ~0ull : (1ull << n) - 1ull); };
// bits u of a key tile whose coordinate along axis a lies in [lo, hi)
auto axis_bits = [&](int a, int lo, int hi) -> unsigned long long {
  const int ta = a == 0 ? KT0 : (a == 1 ? KT1 : KT2);
  const int in = a == 0 ? KT1 * KT2 : (a == 1 ? KT2 : 1);
  unsigned long long rep = 0;  // one bit per period of ta * in bits (a constant once a is)
  for (int p = 0; p < 64; p += ta * in) rep |= 1ull << p;
  lo = na_max(lo, 0);
  hi = na_min(hi, ta);
  return hi > lo ? (low_bits(hi * in) & ~low_bits(lo * in)) * rep : 0ull;
};

// the tile table's entry of tile first + tid
int tb_first = 0;
auto build = [&](int first) {
  __syncthreads();  // nobody reads the old table any more
  tb_first = first;
  const int lin = first + tid;
  if (tid < NA_TT && lin < ntiles) {
    int t[3];
    t[2] = lin % gsh[2][GNKT];
    t[1] = (lin / gsh[2][GNKT]) % gsh[1][GNKT];
    t[0] = lin / (gsh[2][GNKT] * gsh[1][GNKT]);
    int cls = NA_TILE_FULL, info = 0;
    unsigned long long in = ~0ull;
    long long flat = 0;
    for (int a = 0; a < 3; ++a) {
      const int* x = gsh[a];
      const int k0 = x[GKB] + t[a] * KT[a], k1 = na_min(k0 + KT[a], x[GKE]);
      const int ca = na_tile_class(x[GC0], x[GC1], k0, k1, x[GLG], x[GK], x[GS], x[GC] != 0);
      // check bit a: per-element checks along a (partial along it, or truncated)
      const bool chk = ca == NA_TILE_PARTIAL || k1 - k0 < KT[a];
      cls = na_min(cls, ca == NA_TILE_SKIP ? NA_TILE_SKIP : (chk ? NA_TILE_PARTIAL : NA_TILE_FULL));
      info |= (chk ? 4 << a : 0) | (k1 - k0) << (8 + 8 * a);
      in &= axis_bits(a, 0, k1 - k0);
      flat = flat * x[GNK] + (k0 * x[GD] + x[GG] - x[GKVOFF]);
      tb_kr[a][tid] = k0 - x[GKB];
    }
    tb_info[tid] = info | cls;
    tb_in[tid] = in;
    tb_row[tid] = ((long long)b * NK + flat) * HKV + hk;
  }
  __syncthreads();
};
// the first tile at or after lin that is not skipped (ntiles if none); rebuilds the table as needed
auto advance = [&](int lin) -> int {
  for (; lin < ntiles; ++lin) {
    if (lin >= tb_first + NA_TT) build(lin);
    if ((tb_info[lin - tb_first] & 3) != NA_TILE_SKIP) break;
  }
  return lin;
};

if (tid < KT0 + KT1 + KT2 + 3) {
  const int a = tid < PM1 ? 0 : (tid < PM2 ? 1 : 2);
  pm[tid] = axis_bits(a, 0, tid - (a == 0 ? 0 : (a == 1 ? PM1 : PM2)));
}
if (tid < BK) {
  const int u0 = tid / (KT1 * KT2), u1 = (tid / KT2) % KT1, u2 = tid % KT2;
  row_t[tid] = (u0 * ax[0].d * ax[1].nk + u1 * ax[1].d) * ax[2].nk + u2 * ax[2].d;
  if (HAS_RPB) rpb_col[tid] = (u0 * (2 * ax[1].K - 1) + u1) * (2 * ax[2].K - 1) + u2;
} else if (tid < BK + BQ) {
  const int r = tid - BK;
  const int u[3] = {r / (QT1 * QT2), (r / QT2) % QT1, r % QT2};
  for (int a = 0; a < 3; ++a) {
    const int cq = c0[a] + u[a];
    win[0][a][r] = na_window_start(cq, Lg[a], ax[a].K, ax[a].s, ax[a].causal) - kb[a];
    win[1][a][r] = na_window_end(cq, Lg[a], ax[a].K, ax[a].s, ax[a].causal) - kb[a];
  }
}

// this thread's query rows r = warp * 16 + gid (+ 8): their query row index (token * H + head); reads gsh
auto query_row = [&](int rr, bool& ok) -> long long {
  const int r = warp * 16 + gid + rr * 8;
  const int u[3] = {r / (QT1 * QT2), (r / QT2) % QT1, r % QT2};
  ok = true;
  long long flat = 0;
  for (int a = 0; a < 3; ++a) {
    const int* x = gsh[a];
    const int cq = x[GC0] + u[a];
    ok = ok && cq <= x[GC1];
    flat = flat * x[GN] + (cq * x[GD] + x[GG] - x[GQOFF]);
  }
  return ((long long)b * N + flat) * H + h;
};
for (int i = tid; i < BQ * (DCH + DVCH); i += 128) {
  const bool is_q = i < BQ * DCH;
  const int j = is_q ? i : i - BQ * DCH;
  const int ch_n = is_q ? DCH : DVCH;
  const int r = j / ch_n, ch = j % ch_n;
  const int u2 = r % QT2, u1 = (r / QT2) % QT1, u0 = r / (QT1 * QT2);
  const int cc0 = c0[0] + u0, cc1 = c0[1] + u1, cc2 = c0[2] + u2;
  const bool ok = cc0 <= c1[0] && cc1 <= c1[1] && cc2 <= c1[2];
  const long long flat = ((long long)(cc0 * ax[0].d + g[0] - ax[0].qoff) * ax[1].n + (cc1 * ax[1].d + g[1] - ax[1].qoff)) * ax[2].n +
                         (cc2 * ax[2].d + g[2] - ax[2].qoff);
  const long long row = ((long long)b * N + flat) * H + h;
  if (is_q)
    na_cp_async16(Qs + r * QS + ch * 8, ok ? (const void*)(query + row * D + ch * 8) : (const void*)query, ok);
  else
    na_cp_async16(Os + r * VS + ch * 8, ok ? (const void*)(d_out + row * DV + ch * 8) : (const void*)d_out, ok);
}

// key tile (table entry e) -> buffer buf (na_load_rows, common.cuh)
const unsigned key_tok = HKV * D * (unsigned)sizeof(T), value_tok = HKV * DV * (unsigned)sizeof(T);  // bytes per token
auto load_kv = [&](int e, int buf) {
  const unsigned long long in = tb_in[e];
  const long long row = tb_row[e];
  // a tile inside the key range on every axis (most of them) takes the loop without row checks
  if (in == ~0ull) {
    na_load_rows<BK, DCH, true>(tid, row_t, in, key + row * D, key_tok, Ks + buf * BK * QS, QS);
    na_load_rows<BK, DVCH, true>(tid, row_t, in, value + row * DV, value_tok, Vs + buf * BK * VS, VS);
  } else {
    na_load_rows<BK, DCH>(tid, row_t, in, key + row * D, key_tok, Ks + buf * BK * QS, QS);
    na_load_rows<BK, DVCH>(tid, row_t, in, value + row * DV, value_tok, Vs + buf * BK * VS, VS);
  }
};

build(0);  // its first barrier orders the row tables and gsh before any use
bool rowok[2];
int rpb_row[2];  // the row's part of the rpb index, for the key kb
float lse2[2], dl[2];
for (int rr = 0; rr < 2; ++rr) {
  const long long q = query_row(rr, rowok[rr]);
  lse2[rr] = rowok[rr] ? lse[q] * NA_LOG2E : 0.f;
  dl[rr] = rowok[rr] ? delta[q] : 0.f;
  if (HAS_RPB) {
    const int r = warp * 16 + gid + rr * 8;
    const int u[3] = {r / (QT1 * QT2), (r / QT2) % QT1, r % QT2};
    rpb_row[rr] = 0;
    for (int a = 0; a < 3; ++a) rpb_row[rr] = rpb_row[rr] * (2 * ax[a].K - 1) + kb[a] - (c0[a] + u[a]) + ax[a].K - 1;
  }
}

int cur = advance(0);
if (cur < ntiles) load_kv(cur - tb_first, 0);
na_cp_commit();
na_cp_wait_all();
__syncthreads();

// Q and dO stay in shared memory; their A fragments are read per use (registers hold dQ)
const unsigned short* qs = reinterpret_cast<const unsigned short*>(Qs);
const unsigned short* os = reinterpret_cast<const unsigned short*>(Os);

float dq[DP / 8][4];
#pragma unroll
for (int jn = 0; jn < DP / 8; ++jn)
#pragma unroll
  for (int e = 0; e < 4; ++e) dq[jn][e] = 0.f;
const int R = prm[NA_P_RPB];
const T* rpb_h = rpb + (long long)h * R;
float* d_rpb_h = d_rpb + (long long)h * R;

int buf = 0;
while (cur < ntiles) {
  // the current tile's entry, read before the walk may rebuild the table
  const int ce = cur - tb_first;
  const int info = tb_info[ce];
  const bool part = (info & 3) == NA_TILE_PARTIAL;
  // per row, bit u: key u of the tile is in the row's window (absent rows: none)
  unsigned long long msk[2];
  int rpb_t = 0;  // the tile's part of the rpb index
  {
    int kr[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) kr[a] = tb_kr[a][ce];
    msk[0] = rowok[0] ? ~0ull : 0ull;
    msk[1] = rowok[1] ? ~0ull : 0ull;
    if (part) {
      const int* w = &win[0][0][warp * 16 + gid];  // this thread's first row; the second 8 rows on
#pragma unroll
      for (int a = 0; a < 3; ++a)
        if (info & (4 << a)) {
          const unsigned long long* p = pm + (a == 0 ? 0 : (a == 1 ? PM1 : PM2));
          const int ext = (info >> (8 + 8 * a)) & 255;  // <= KT[a]
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const int lo = na_min(na_max(w[a * BQ + rr * 8] - kr[a], 0), KT[a]);
            const int hi = na_max(na_min(w[(3 + a) * BQ + rr * 8] - kr[a], ext), 0);
            msk[rr] &= p[hi] & ~p[lo];
          }
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) msk[rr] >>= 2 * tig;  // bit j * 8 + i: column j * 8 + 2 tig + i
    if (HAS_RPB)
#pragma unroll
      for (int a = 0; a < 3; ++a) rpb_t = rpb_t * (2 * gsh[a][GK] - 1) + kr[a];
  }
  const int nxt = advance(cur + 1);
  if (nxt < ntiles) load_kv(nxt - tb_first, buf ^ 1);
  na_cp_commit();
  na_cp_wait_one();
  __syncthreads();

  const unsigned short* kbuf = reinterpret_cast<const unsigned short*>(Ks + buf * BK * QS);
  const unsigned short* vbuf = reinterpret_cast<const unsigned short*>(Vs + buf * BK * VS);

  float s[8][4], dp[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = 0.f;
      dp[j][e] = 0.f;
    }
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    unsigned af[4];
    na_frag_a<LDSM>(af, qs, QS, warp * 16, kk * 16, lane);
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      unsigned bf[4];
      na_frag_b_nk<LDSM>(bf, kbuf, QS, j * 8, kk * 16, lane);
      na_mma<T>(s[j], af, bf);
      na_mma<T>(s[j + 1], af, bf + 2);
    }
  }
#pragma unroll
  for (int kk = 0; kk < DVP / 16; ++kk) {
    unsigned af[4];
    na_frag_a<LDSM>(af, os, VS, warp * 16, kk * 16, lane);
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      unsigned bf[4];
      na_frag_b_nk<LDSM>(bf, vbuf, VS, j * 8, kk * 16, lane);
      na_mma<T>(dp[j], af, bf);
      na_mma<T>(dp[j + 1], af, bf + 2);
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int rr = e >> 1;
      float x = s[j][e] * scale_log2;
      // full tiles need no mask: absent rows have zero q and d_out rows, so their dS is 0 (and not stored)
      const bool ok = (HAS_RPB || part) ? ((msk[rr] >> (j * 8 + (e & 1))) & 1ull) != 0ull : true;
      int ri = 0;
      if (HAS_RPB && ok) {
        ri = rpb_row[rr] + rpb_t + rpb_col[j * 8 + tig * 2 + (e & 1)];
        x += na_f(rpb_h[ri]) * NA_LOG2E;
      }
      const float p = ok ? na_exp2(x - lse2[rr]) : 0.f;
      const float ds = p * (dp[j][e] - dl[rr]);
      if (HAS_RPB && ok) atomicAdd((SRPB ? srpb : d_rpb_h) + ri, ds);
      s[j][e] = ds;
    }
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    unsigned af[4];
    af[0] = NaType<T>::pack2(s[2 * kk][0], s[2 * kk][1]);
    af[1] = NaType<T>::pack2(s[2 * kk][2], s[2 * kk][3]);
    af[2] = NaType<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    af[3] = NaType<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
    for (int jn = 0; jn < DP / 8; jn += 2) {
      unsigned bf[4];
      na_frag_b_kn<LDSM>(bf, kbuf, QS, kk * 16, jn * 8, lane);
      na_mma<T>(dq[jn], af, bf);
      na_mma<T>(dq[jn + 1], af, bf + 2);
    }
  }
  __syncthreads();
  cur = nxt;
  buf ^= 1;
}
if (SRPB)  // the walk's last barrier orders every shared sum before these reads
  for (int i = tid; i < R; i += 128) {
    const float v = srpb[i];
    if (v != 0.f) atomicAdd(d_rpb_h + i, v);
  }

for (int rr = 0; rr < 2; ++rr) {
  bool ok;
  const long long q = query_row(rr, ok);
  if (!ok) continue;
#pragma unroll
  for (int jn = 0; jn < DP / 8; ++jn) {
    const int col = jn * 8 + tig * 2;
    if (col < D) {
      d_query[q * D + col] = dq[jn][2 * rr] * scale;
      d_query[q * D + col + 1] = dq[jn][2 * rr + 1] * scale;
    }
  }
}
