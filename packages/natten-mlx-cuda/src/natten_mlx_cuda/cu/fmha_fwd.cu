// Fused neighborhood attention forward on the tensor cores (float16/bfloat16), flash-attention style.
// One block of NW warps per (query tile, head, batch). The query tile is a box of QT0 x QT1 x QT2 =
// 16 MT NW in-group coordinates of one dilation group per axis (tiling.h); the union of its windows is
// one key range per axis, walked in key tiles of KT0 x KT1 x KT2 = 64 keys, in a ring of STAGES shared
// memory slots filled through cp.async (STAGES - 1 tiles in flight while one is computed). Each warp owns 16 MT query rows (MT = 2 halves the shared-memory reads
// per mma: each K or V fragment serves both m-tiles, as in FlashAttention-2): S = Q K^T and O += P V through mma.sync
// m16n8k16, the online softmax (base 2) in registers. Per-element masks only on key tiles that
// tiling.h classes PARTIAL (or that the key range truncates); SKIP tiles are never loaded.
//
// The per-tile bookkeeping is done once per block, not once per tile and thread: the block's
// geometry, each query row's window and the list of key tiles (class, extents, first token) are
// built cooperatively into shared memory before the walk (in chunks of MAXT tiles), so the loop
// spends its instructions on the mma, the softmax and the loads. (Measured on the H200: the kernels
// were issue-bound, with ~100 registers of per-block geometry live across the loop.)
//
// Inputs query [B, N, H, D], key [B, NK, HKV, D], value [B, NK, HKV, DV], rpb [H, prod(2K-1)] (one
// dummy element without HAS_RPB), prm, scl. Outputs out [B, N, H, DV] (OT), lse [B, N, H] float32.
// Template: T, OT, D, DV (multiples of 8), DP, DVP (padded to 16), QT0..2, KT0..2, HAS_RPB, LDSM
// (B fragments through ldmatrix), NW (warps: 4 or 8), MT (m-tiles of 16 query rows per warp: 1 or 2),
// MAXT (key tiles listed per chunk of the walk), STAGES (2 or 3 key-tile slots), QALIAS (Q in a K slot),
// SPLIT (blocks per query tile: block y = h SPLIT + sp walks the sp-th of SPLIT equal parts of the tile
// list and writes its own normalised out and lse, OT float32, to out[sp] [B, N, H, DV] and lse[sp]; the
// caller merges the parts by their lse. A part whose keys miss a row's window writes 0 and -inf.),
// WG (the products by warpgroup MMA, sm_90a only: see below).
constexpr int NT = 32 * NW;
constexpr int BQ = QT0 * QT1 * QT2;
constexpr int BK = KT0 * KT1 * KT2;
static_assert(BQ == 16 * MT * NW && BK == 64, "query tiles of 16 MT rows per warp, key tiles of 64 keys");
// WG: S = Q K^T and O += P V by wgmma (sm_90a) instead of mma.sync: NW / 4 warpgroups of 64 query rows
// (warp w keeps the rows and accumulator layout it has with mma.sync, so the masks, the softmax and the
// epilogue are shared), Q, K and V in 128-byte-swizzled shared tiles (common.cuh na_sw_off) that wgmma
// reads through descriptors; S takes both operands from shared memory, P V takes P from registers.
// wgmma is asynchronous: each product is committed and waited for before its accumulators are read, and
// cp.async's writes are fenced to the async proxy before the barrier that publishes a tile. Standalone,
// this structure ran dense attention at 438 TFLOP/s on the H200 against 318 for the mma.sync path
// (benchmarks/gpu/wgmma_attn.py, session 10).
static_assert(!WG || (MT == 1 && NW % 4 == 0 && D == DP && DV == DVP && DP % 64 == 0 && DVP % 64 == 0 && !QALIAS),
              "WG: 16-row warps in whole warpgroups, head dims multiples of 64, Q not in a K slot");
constexpr int QS = WG ? DP : DP + 8;    // shared row stride (elements) of Q and K: 16 bytes of padding against bank conflicts
constexpr int VS = WG ? DVP : DVP + 8;  // same for V (WG: swizzled tiles, no padding)
constexpr int DCH = D / 8, DVCH = DV / 8;  // 16-byte chunks per row
const int KT[3] = {KT0, KT1, KT2};

const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int h = SPLIT > 1 ? blockIdx.y / SPLIT : blockIdx.y, b = blockIdx.z;
const int hk = h / (H / HKV);
const float scale_log2 = scl[0] * NA_LOG2E;
const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;

// QALIAS: Q lives in the second K slot of the ring. Its fragments go to registers before the walk,
// and the first load into that slot is issued after the walk's first barrier, which every warp passes
// only once it has read them; a block then needs 17 KB (D 128) less, and three fit on an SM.
static_assert(!QALIAS || (BQ == BK && STAGES == 2 && (MT == 1 || DP <= 64)), "Q aliases a K slot only when it is read once");
NA_SHARED_DECL;
// WG: the tiles start 1024-byte aligned (the swizzle's 8-row groups); plan.py adds the slack
unsigned char* const sm0 = na_smem + (WG ? ((1024u - (na_smem_addr(na_smem) & 1023u)) & 1023u) : 0u);
T* Qs = reinterpret_cast<T*>(sm0) + (QALIAS ? BK * QS : 0);
T* Ks = reinterpret_cast<T*>(sm0) + (QALIAS ? 0 : BQ * QS);
T* Vs = Ks + STAGES * BK * QS;
// pm[65 a + x]: the key tile's columns (bit c for the tile's key c, row-major, axis 2 fastest) whose
// coordinate along axis a is below x, for 0 <= x <= KT[a]: the columns with coordinate in [lo, hi) are
// pm[hi] & ~pm[lo], so a row's valid keys in a tile are a few 64-bit ANDs and a column test one bit
// elements of T in the Q tile and the K/V ring (zeroed before the walk; the staged output after it)
constexpr int TILE_ELEMS = (QALIAS ? 0 : BQ * QS) + STAGES * BK * QS + STAGES * BK * VS;
unsigned long long* pm = reinterpret_cast<unsigned long long*>(Vs + STAGES * BK * VS);
int* geo = reinterpret_cast<int*>(pm + 3 * (BK + 1));  // NA_FWD_GEO ints: the block's geometry
int* rows = geo + NA_FWD_GEO;                          // 8 ints per query row: ws[3], we[3], present, flat
int* tl = rows + 8 * BQ;                               // 5 ints per listed key tile: tok, k0[3], meta
int* koff = tl + 5 * MAXT;                             // per key-tile row: its token offset from the tile's first
int* rct = koff + BK;  // HAS_RPB: per key-tile column, its part of the rpb index (row-major over 2K - 1 per axis)
// geo layout: per axis a: c0 [a], c1 [3+a], Lg [6+a], kb [9+a], ke [12+a], nkt [15+a], kst [18+a]
// (flat-index step of one key coordinate), qst [21+a] (same for queries), key and query flat-index
// bases [24+a] and [27+a], empty [30+a].
if (tid < 3) {
  const int a = tid;
  const NaAxis x = na_axis(prm, a);
  // the block's query tile: its dilation group and coordinate range per axis (tiling.h, as Metal)
  const int u = na_tile_digit(blockIdx.x, prm[8 + 10 * 1 + 7] * prm[8 + 10 * 1 + 9], prm[8 + 10 * 2 + 7] * prm[8 + 10 * 2 + 9], a);
  const int g = na_tile_group(u, x.qtiles);
  const int qt = a == 0 ? QT0 : a == 1 ? QT1 : QT2;
  const int c0 = na_tile_first(u, x.qtiles, x.qoff, x.d, qt);
  const int c1 = na_tile_last(u, x.qtiles, x.qoff, x.n, x.d, qt);
  const int Lg = na_group_len(x.L, x.d, g);
  const int kb = na_tile_key_begin(c0, Lg, x.K, x.s, x.causal);
  const int ke = na_tile_key_end(c1, Lg, x.K, x.s, x.causal);
  int kstride = 1, qstride = 1;
  for (int a2 = a + 1; a2 < 3; ++a2) {
    kstride *= prm[8 + 10 * a2 + 2];
    qstride *= prm[8 + 10 * a2 + 1];
  }
  geo[a] = c0;
  geo[3 + a] = c1;
  geo[6 + a] = Lg;
  geo[9 + a] = kb;
  geo[12 + a] = ke;
  geo[15 + a] = na_key_tiles(kb, ke, a == 0 ? KT0 : a == 1 ? KT1 : KT2);
  geo[18 + a] = x.d * kstride;
  geo[21 + a] = x.d * qstride;
  geo[24 + a] = (g - x.kvoff) * kstride;
  geo[27 + a] = (g - x.qoff) * qstride;
  geo[30 + a] = c1 < c0;  // the grid covers the group with the most tiles
}
for (int i = tid; i < 3 * (BK + 1); i += NT) {
  // column c's coordinate along a is (c / inner) % KT[a]: the columns below x are the low x * inner bits of
  // each period of KT[a] * inner bits, a power of two (BK = 64), so the pattern doubles up to 64 bits
  const int a = i / (BK + 1), x = i % (BK + 1);
  const int kta = a == 0 ? KT0 : a == 1 ? KT1 : KT2, inner = a == 0 ? KT1 * KT2 : a == 1 ? KT2 : 1;
  unsigned long long m = x >= kta ? (x == kta ? ~0ull : 0ull) : (1ull << (x * inner)) - 1ull;
  if (x < kta)
    for (int per = kta * inner; per < BK; per *= 2) m |= m << per;
  pm[i] = m;
}
{
  // padding columns and the rows of absent tokens stay zero for the whole kernel
  uint4* z = reinterpret_cast<uint4*>(sm0);
  const int nz = (int)(TILE_ELEMS * sizeof(T) / 16);
  for (int i = tid; i < nz; i += NT) z[i] = make_uint4(0u, 0u, 0u, 0u);
}
__syncthreads();
if (geo[30] | geo[31] | geo[32]) return;  // the same for the whole block

const int c0[3] = {geo[0], geo[1], geo[2]};
for (int r = tid; r < BK; r += NT) {
  koff[r] = (r / (KT1 * KT2)) * geo[18] + ((r / KT2) % KT1) * geo[19] + (r % KT2) * geo[20];
  if (HAS_RPB) rct[r] = ((r / (KT1 * KT2)) * (2 * prm[18 + 5] - 1) + (r / KT2) % KT1) * (2 * prm[28 + 5] - 1) + r % KT2;
}
const int nkt1 = geo[16], nkt2 = geo[17];
const int ntiles = geo[15] * nkt1 * nkt2;

// each query row's window per axis, whether it is present, its local flat index
for (int r = tid; r < BQ; r += NT) {
  const int u[3] = {r / (QT1 * QT2), (r / QT2) % QT1, r % QT2};
  bool ok = true;
  int flat = geo[27] + geo[28] + geo[29];
  for (int a = 0; a < 3; ++a) {
    const int cq = c0[a] + u[a];
    ok = ok && cq <= geo[3 + a];
    flat += cq * geo[21 + a];
  }
  for (int a = 0; a < 3; ++a) {
    const int cq = c0[a] + u[a];
    const int K = prm[8 + 10 * a + 5], s = prm[8 + 10 * a + 6];
    const bool causal = prm[8 + 10 * a + 8] != 0;
    // absent rows: never stored; a window that masks nothing keeps their numbers finite
    rows[8 * r + a] = ok ? na_window_start(cq, geo[6 + a], K, s, causal) : -(1 << 29);
    rows[8 * r + 3 + a] = ok ? na_window_end(cq, geo[6 + a], K, s, causal) : (1 << 29);
  }
  rows[8 * r + 6] = ok;
  rows[8 * r + 7] = flat;
}

// list key tiles [cs, cs + cn) of the walk: first token, box start, class | check bits | extents
auto build = [&](int cs, int cn) {
  for (int j = tid; j < cn; j += NT) {
    const int lin = cs + j;
    const int t[3] = {lin / (nkt1 * nkt2), (lin / nkt2) % nkt1, lin % nkt2};
    int cls = NA_TILE_FULL, chk = 0, tok = geo[24] + geo[25] + geo[26], meta = 0;
    for (int a = 0; a < 3; ++a) {
      const int k0 = geo[9 + a] + t[a] * KT[a];
      const int k1 = na_min(k0 + KT[a], geo[12 + a]);
      tok += k0 * geo[18 + a];
      const int ca = na_tile_class(geo[a], geo[3 + a], k0, k1, geo[6 + a], prm[8 + 10 * a + 5], prm[8 + 10 * a + 6],
                                   prm[8 + 10 * a + 8] != 0);
      if (ca == NA_TILE_SKIP) cls = NA_TILE_SKIP;
      if (ca == NA_TILE_PARTIAL || k1 - k0 < KT[a]) {
        if (cls != NA_TILE_SKIP) cls = NA_TILE_PARTIAL;
        chk |= 1 << a;
      }
      meta |= (k1 - k0) << (5 + 7 * a);
      if (k1 - k0 < KT[a]) meta |= NA_FWD_SHORT;
      tl[5 * j + 1 + a] = k0;
    }
    tl[5 * j] = tok;
    tl[5 * j + 4] = meta | cls | (chk << 2);
  }
};
auto next_tile = [&](int i, int cn) -> int {
  while (i < cn && (tl[5 * i + 4] & 3) == NA_TILE_SKIP) ++i;
  return i;
};
const unsigned key_tok = HKV * D * (unsigned)sizeof(T), value_tok = HKV * DV * (unsigned)sizeof(T);  // bytes per token
const T* kbase = key + ((long long)b * NK * HKV + hk) * D;
const T* vbase = value + ((long long)b * NK * HKV + hk) * DV;
// The tile's key rows: row r is token tok + koff[r] when its coordinates are inside the tile's extents
// (bit r of the mask; no test for tiles with full extents, a meta bit), na_load_rows (common.cuh).
auto load_kv = [&](int i, int buf) {
  T* kd = Ks + buf * BK * QS;
  T* vd = Vs + buf * BK * VS;
  const int meta = tl[5 * i + 4];
  const long long tok = tl[5 * i];
  const T* kg = kbase + tok * (HKV * D);
  const T* vg = vbase + tok * (HKV * DV);
  if (meta & NA_FWD_SHORT) {
    const unsigned long long in =
        pm[(meta >> 5) & 127] & pm[(BK + 1) + ((meta >> 12) & 127)] & pm[2 * (BK + 1) + ((meta >> 19) & 127)];
    na_load_rows<BK, DCH, false, NT, WG>(tid, koff, in, kg, key_tok, kd, QS);
    na_load_rows<BK, DVCH, false, NT, WG>(tid, koff, in, vg, value_tok, vd, VS);
  } else {
    na_load_rows<BK, DCH, true, NT, WG>(tid, koff, ~0ull, kg, key_tok, kd, QS);
    na_load_rows<BK, DVCH, true, NT, WG>(tid, koff, ~0ull, vg, value_tok, vd, VS);
  }
};

__syncthreads();  // the row table
// Q tile -> shared
for (int i = tid; i < BQ * DCH; i += NT) {
  const int r = i / DCH, ch = i % DCH;
  const bool ok = rows[8 * r + 6] != 0;
  const long long row = ((long long)b * N + rows[8 * r + 7]) * H + h;
  na_cp_async16(Qs + (WG ? na_sw_off<BQ>(r, ch) : r * QS + ch * 8), ok ? (const void*)(query + row * D + ch * 8) : (const void*)query, ok);
}
na_cp_commit();

// this thread's query rows: m-tile mt of the warp holds rows (warp * MT + mt) * 16 + gid (+ 8)
int r_own[MT][2];
#pragma unroll
for (int mt = 0; mt < MT; ++mt) {
  r_own[mt][0] = (warp * MT + mt) * 16 + gid;
  r_own[mt][1] = r_own[mt][0] + 8;
}
// Q as A fragments in registers when they fit beside two m-tiles' accumulators; else read from
// shared memory per k step (each one then serves 8 mma)
constexpr bool QREG = !WG && (MT == 1 || DP <= 64);
unsigned qf[QREG ? MT : 1][QREG ? DP / 16 : 1][4];
float o[MT][DVP / 8][4];
#pragma unroll
for (int mt = 0; mt < MT; ++mt)
  #pragma unroll
  for (int jn = 0; jn < DVP / 8; ++jn)
    #pragma unroll
    for (int e = 0; e < 4; ++e) o[mt][jn][e] = 0.f;
float mrow[MT][2], lrow[MT][2];
#pragma unroll
for (int mt = 0; mt < MT; ++mt)
  #pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    mrow[mt][rr] = NA_NEG_INF;
    lrow[mt][rr] = 0.f;
  }
// rpb: entry (kc - qc + K - 1) per axis, row-major over 2K - 1 per axis, is rct[column] + the row's part
// (rq, fixed for the block) + the tile's part (its first key); linear in the per-axis terms, so the three
// parts add. Absent rows (never stored) have no window: their index is clamped into the table.
const unsigned Rm1 = (unsigned)prm[NA_P_RPB] - 1u;
const int M1 = 2 * prm[18 + 5] - 1, M2 = 2 * prm[28 + 5] - 1;
const T* rpbh = rpb + (long long)h * prm[NA_P_RPB];
int rq[MT][2];
#pragma unroll
for (int mt = 0; mt < MT; ++mt)
  #pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = r_own[mt][rr];
    const int uq[3] = {r / (QT1 * QT2), (r / QT2) % QT1, r % QT2};
    rq[mt][rr] = ((prm[8 + 5] - 1 - c0[0] - uq[0]) * M1 + prm[18 + 5] - 1 - c0[1] - uq[1]) * M2 + prm[28 + 5] - 1 - c0[2] - uq[2];
  }
const unsigned short* qs = reinterpret_cast<const unsigned short*>(Qs);
bool have_q = false;
int buf = 0;  // ring slot of the tile computed next
// tiles in flight beyond the current one (STAGES - 2 of them), cn when none
int ahead[STAGES > 2 ? STAGES - 2 : 1];

// this block's part of the walk (all of it without SPLIT)
const int sp = SPLIT > 1 ? blockIdx.y % SPLIT : 0;
const int t_lo = SPLIT > 1 ? (int)((long long)ntiles * sp / SPLIT) : 0;
const int t_hi = SPLIT > 1 ? (int)((long long)ntiles * (sp + 1) / SPLIT) : ntiles;
for (int cs = t_lo; cs < t_hi; cs += MAXT) {
  const int cn = na_min(MAXT, t_hi - cs);
  __syncthreads();  // nobody reads the previous chunk's list any more
  build(cs, cn);
  __syncthreads();
  int cur = next_tile(0, cn);
  if (cur < cn) load_kv(cur, buf);
  na_cp_commit();
  {
    int t = cur;
#pragma unroll
    for (int st = 0; st < STAGES - 2; ++st) {
      t = t < cn ? next_tile(t + 1, cn) : cn;
      ahead[st] = t;
      if (t < cn) load_kv(t, (buf + 1 + st) % STAGES);
      na_cp_commit();
    }
  }
  if (!have_q) {
    na_cp_wait_all();
    if (WG) na_fence_proxy_async();
    __syncthreads();
    if (QREG) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk)
          na_frag_a<LDSM>(qf[QREG ? mt : 0][QREG ? kk : 0], qs, QS, (warp * MT + mt) * 16, kk * 16, lane);
    }
    have_q = true;
  }
  while (cur < cn) {
    // One barrier per tile: once the current tile's copies are complete (every group but the newest
    // STAGES - 2) and every warp is past the barrier, every warp has finished the previous tile, so
    // its slot takes the next load; the compute of this tile hides that load.
    na_cp_wait<STAGES - 2>();
    if (WG) na_fence_proxy_async();
    __syncthreads();
    const int last = STAGES > 2 ? ahead[STAGES > 2 ? STAGES - 3 : 0] : cur;
    const int issue = last < cn ? next_tile(last + 1, cn) : cn;
    if (issue < cn) load_kv(issue, (buf + STAGES - 1) % STAGES);
    na_cp_commit();

    const int meta = tl[5 * cur + 4];
    const int cls = meta & 3, chk = (meta >> 2) & 7;
    const int k0[3] = {tl[5 * cur + 1], tl[5 * cur + 2], tl[5 * cur + 3]};
    const int rt = HAS_RPB ? (k0[0] * M1 + k0[1]) * M2 + k0[2] : 0;  // the tile's part of the rpb index
    const unsigned short* kbuf = reinterpret_cast<const unsigned short*>(Ks + buf * BK * QS);
    const unsigned short* vbuf = reinterpret_cast<const unsigned short*>(Vs + buf * BK * VS);

    float s[MT][8][4];
    if (WG) {
      // this warpgroup's 64 rows x the tile's 64 keys; Q's panel kk / 4 from the warpgroup's first row
      float* sd = &s[0][0][0];
      #pragma unroll
      for (int i = 0; i < 32; ++i) na_wg_pin(sd[i]);
      na_wg_fence();
      #pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk)
        na_wg_ss<T>(sd, qs + (kk >> 2) * BQ * 64 + (warp >> 2) * 64 * 64 + (kk & 3) * 16,
                    kbuf + (kk >> 2) * BK * 64 + (kk & 3) * 16, kk);
      na_wg_commit();
      na_wg_wait<0>();
      #pragma unroll
      for (int i = 0; i < 32; ++i) na_wg_pin(sd[i]);
    } else {
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int j = 0; j < 8; ++j)
          #pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
      // k outermost: the 8 MT accumulators of a k step are independent, so consecutive mma never wait
      // on each other; each B fragment read from shared memory serves MT m-tiles
      #pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        unsigned af[QREG ? 1 : MT][4];
        if (!QREG)
          #pragma unroll
          for (int mt = 0; mt < MT; ++mt) na_frag_a<LDSM>(af[QREG ? 0 : mt], qs, QS, (warp * MT + mt) * 16, kk * 16, lane);
        #pragma unroll
        for (int j = 0; j < 8; j += 2) {
          unsigned bf[4];
          na_frag_b_nk<LDSM>(bf, kbuf, QS, j * 8, kk * 16, lane);
          #pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const unsigned* a = QREG ? qf[QREG ? mt : 0][QREG ? kk : 0] : af[QREG ? 0 : mt];
            na_mma<T>(s[mt][j], a, bf);
            na_mma<T>(s[mt][j + 1], a, bf + 2);
          }
        }
      }
    }
    // without rpb the scores stay raw (masked ones -inf): with a positive scale the row max commutes
    // with it, and exp2(s * scale - m) is one FFMA per element instead of a multiply and a subtraction
    const bool raw = !HAS_RPB && scale_log2 > 0.f;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (HAS_RPB || cls == NA_TILE_PARTIAL) {
        // per row, the tile's valid columns as bits (pm), shifted so that bit 8 j + e is this
        // thread's column j * 8 + 2 tig + e; only the checked axes cost anything
        unsigned vb[2][2];
        #pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          unsigned long long m = ~0ull;
          if (cls == NA_TILE_PARTIAL)
            #pragma unroll
            for (int a = 0; a < 3; ++a)
              if (chk & (1 << a)) {
                const int ext = (meta >> (5 + 7 * a)) & 127;
                const int lo = na_min(na_max(rows[8 * r_own[mt][rr] + a] - k0[a], 0), KT[a]);
                const int hi = na_min(na_max(na_min(rows[8 * r_own[mt][rr] + 3 + a], k0[a] + ext) - k0[a], 0), KT[a]);
                m &= pm[(BK + 1) * a + hi] & ~pm[(BK + 1) * a + lo];
              }
          m >>= 2 * tig;
          vb[rr][0] = (unsigned)m;
          vb[rr][1] = (unsigned)(m >> 32);
        }
        #pragma unroll
        for (int j = 0; j < 8; ++j)
          #pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int rr = e >> 1;
            float x = raw ? s[mt][j][e] : s[mt][j][e] * scale_log2;
            const int col = j * 8 + tig * 2 + (e & 1);
            const bool ok = (vb[rr][j >> 2] >> (8 * (j & 3) + (e & 1))) & 1u;
            if (!ok) {
              x = NA_NEG_INF;
            } else if (HAS_RPB) {
              const unsigned ri = (unsigned)(rt + rq[mt][rr] + rct[col]);
              x += na_f(rpbh[ri < Rm1 ? ri : Rm1]) * NA_LOG2E;
            }
            s[mt][j][e] = x;
          }
      } else if (!raw) {
        #pragma unroll
        for (int j = 0; j < 8; ++j)
          #pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][j][e] *= scale_log2;
      }
      float alpha[2];
      #pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float mx = NA_NEG_INF;
        #pragma unroll
        for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * rr], s[mt][j][2 * rr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        if (raw) mx *= scale_log2;
        const float mnew = fmaxf(mrow[mt][rr], mx);
        const float muse = mnew == NA_NEG_INF ? 0.f : mnew;
        alpha[rr] = mnew == mrow[mt][rr] ? 1.f : na_exp2(mrow[mt][rr] - muse);
        mrow[mt][rr] = mnew;
        float sum = 0.f;
        const float sc = raw ? scale_log2 : 1.f;
        #pragma unroll
        for (int j = 0; j < 8; ++j)
          #pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = na_exp2(fmaf(s[mt][j][2 * rr + e], sc, -muse));
            s[mt][j][2 * rr + e] = p;
            sum += p;
          }
        lrow[mt][rr] = lrow[mt][rr] * alpha[rr] + sum;
      }
      // the running max of most rows stops moving after a few tiles: rescale the accumulators only
      // when the max of some row of the warp moved (else every alpha is 1)
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f))
        #pragma unroll
        for (int jn = 0; jn < DVP / 8; ++jn) {
          o[mt][jn][0] *= alpha[0];
          o[mt][jn][1] *= alpha[0];
          o[mt][jn][2] *= alpha[1];
          o[mt][jn][3] *= alpha[1];
        }
    }
    // P of m-tile mt, keys 16 kk .. 16 kk + 15, as mma's A fragment (wgmma's register A operand too)
    auto pack_p = [&](unsigned* a, int mt, int kk) {
      a[0] = NaType<T>::pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
      a[1] = NaType<T>::pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
      a[2] = NaType<T>::pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
      a[3] = NaType<T>::pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
    };
    if (WG) {
      // P packed first: wgmma.fence must separate the writes of its A registers from the products
      unsigned pw[4][4];
      #pragma unroll
      for (int kk = 0; kk < 4; ++kk) pack_p(pw[kk], 0, kk);
      float* const od = &o[0][0][0];
      #pragma unroll
      for (int i = 0; i < DVP / 2; ++i) na_wg_pin(od[i]);
      na_wg_fence();
      // keys 16 kk .. 16 kk + 15 of each 64-column V panel into that panel's 32 accumulators
      #pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        #pragma unroll
        for (int p = 0; p < DVP / 64; ++p) na_wg_rs<T>(od + 32 * p, pw[kk], vbuf + p * BK * 64 + kk * 16 * 64, 1);
      na_wg_commit();
      na_wg_wait<0>();
      #pragma unroll
      for (int i = 0; i < DVP / 2; ++i) na_wg_pin(od[i]);
    } else {
      #pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        unsigned pf[MT][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) pack_p(pf[mt], mt, kk);
        #pragma unroll
        for (int jn = 0; jn < DVP / 8; jn += 2) {
          unsigned bf[4];
          na_frag_b_kn<LDSM>(bf, vbuf, VS, kk * 16, jn * 8, lane);
          #pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            na_mma<T>(o[mt][jn], pf[mt], bf);
            na_mma<T>(o[mt][jn + 1], pf[mt], bf + 2);
          }
        }
      }
    }
    const int nxt = STAGES > 2 ? ahead[0] : issue;
#pragma unroll
    for (int st = 0; st + 1 < STAGES - 2; ++st) ahead[st] = ahead[st + 1];
    if (STAGES > 2) ahead[STAGES > 2 ? STAGES - 3 : 0] = issue;
    cur = nxt;
    buf = buf + 1 == STAGES ? 0 : buf + 1;
  }
}

if (SPLIT > 1 && !have_q) na_cp_wait_all();  // an empty part: Q's copy is still in flight
const long long part = SPLIT > 1 ? (long long)sp * gridDim.z * N * H : 0;  // out[sp], lse[sp]
// STAGE_OUT: the normalised rows go through shared memory (Q and the K/V ring, free after the walk; rows
// padded by 16 bytes against bank conflicts) and leave as whole 16-byte chunks of a row, instead of each
// thread's 4-byte pieces of 8 rows (the epilogue was ~8% of G1's stall samples, ncu on the H200).
constexpr int OS = DVP + 8;
constexpr bool STAGE_OUT = SPLIT == 1 && sizeof(OT) == 2 &&
                           BQ * OS * 2 <= TILE_ELEMS * (int)sizeof(T);
OT* const os = reinterpret_cast<OT*>(sm0);
if (STAGE_OUT) {
  na_cp_wait_all();  // no copy of the walk still lands in the ring
  __syncthreads();   // and no warp still reads Q, K or V
}
#pragma unroll
for (int mt = 0; mt < MT; ++mt)
  #pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = lrow[mt][rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = r_own[mt][rr];
    if (!rows[8 * r + 6]) continue;
    const long long qrow = part + ((long long)b * N + rows[8 * r + 7]) * H + h;
    // only a part of a SPLIT walk can miss a row's whole window: its share is 0 with weight exp(-inf)
    const bool none = SPLIT > 1 && l == 0.f;
    const float inv = none ? 0.f : 1.f / l;
    #pragma unroll
    for (int jn = 0; jn < DVP / 8; ++jn) {
      const int col = jn * 8 + tig * 2;
      // col is even and DV a multiple of 8: both columns are in the row, one 32-bit store for 16-bit types
      if (col < DV)
        NaType<OT>::store2((STAGE_OUT ? os + r * OS : out + qrow * DV) + col, o[mt][jn][2 * rr] * inv,
                           o[mt][jn][2 * rr + 1] * inv);
    }
    if (tig == 0) lse[qrow] = none ? NA_NEG_INF : (mrow[mt][rr] + log2f(l)) * NA_LN2;
  }
if (STAGE_OUT) {
  __syncthreads();
  for (int i = tid; i < BQ * DVCH; i += NT) {
    const int r = i / DVCH, ch = i % DVCH;
    if (!rows[8 * r + 6]) continue;
    const long long qrow = ((long long)b * N + rows[8 * r + 7]) * H + h;
    *reinterpret_cast<uint4*>(out + qrow * DV + ch * 8) = *reinterpret_cast<const uint4*>(os + r * OS + ch * 8);
  }
}
