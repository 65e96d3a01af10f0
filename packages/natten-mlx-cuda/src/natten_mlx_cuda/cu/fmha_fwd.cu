// Fused neighborhood attention forward on the tensor cores (float16/bfloat16), flash-attention style.
// One block of 4 warps per (query tile, head, batch). The query tile is a box of QT0 x QT1 x QT2 = 64
// in-group coordinates of one dilation group per axis (tiling.h); the union of its windows is one
// key range per axis, walked in key tiles of KT0 x KT1 x KT2 = 64 keys, double-buffered in shared
// memory through cp.async. Each warp owns 16 query rows: S = Q K^T and O += P V through mma.sync
// m16n8k16, the online softmax (base 2) in registers. Per-element masks only on key tiles that
// tiling.h classes PARTIAL (or that the key range truncates); SKIP tiles are never loaded.
// Inputs query [B, N, H, D], key [B, NK, HKV, D], value [B, NK, HKV, DV], rpb [H, prod(2K-1)] (one
// dummy element without HAS_RPB), prm, scl. Outputs out [B, N, H, DV] (OT), lse [B, N, H] float32.
// Template: T, OT, D, DV (multiples of 8), DP, DVP (padded to 16), QT0..2, KT0..2, HAS_RPB, LDSM (B fragments through ldmatrix).
constexpr int BQ = QT0 * QT1 * QT2;
constexpr int BK = KT0 * KT1 * KT2;
static_assert(BQ == 64 && BK == 64, "tiles of 64 queries and 64 keys");
constexpr int QS = DP + 8;   // shared row stride (elements) of Q and K: 16 bytes of padding against bank conflicts
constexpr int VS = DVP + 8;  // same for V
constexpr int DCH = D / 8, DVCH = DV / 8;  // 16-byte chunks per row
const int QT[3] = {QT0, QT1, QT2};
const int KT[3] = {KT0, KT1, KT2};

const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int h = blockIdx.y, b = blockIdx.z;
const int hk = h / (H / HKV);
const float scale_log2 = scl[0] * NA_LOG2E;

NaAxis ax[3];
int g[3], c0[3], c1[3], Lg[3], kb[3], ke[3], nkt[3];
{
  int rem = blockIdx.x;
  int tq[3];
  for (int a = 2; a >= 0; --a) {
    ax[a] = na_axis(prm, a);
    const int per = ax[a].d * ax[a].qtiles;
    tq[a] = rem % per;
    rem /= per;
  }
  bool empty = false;
  for (int a = 0; a < 3; ++a) {
    g[a] = tq[a] / ax[a].qtiles;
    const int first = na_group_first(ax[a].qoff, ax[a].d, g[a]);
    const int end = na_group_end(ax[a].qoff, ax[a].n, ax[a].d, g[a]);
    c0[a] = first + (tq[a] % ax[a].qtiles) * QT[a];
    empty = empty || c0[a] >= end;
    c1[a] = na_min(c0[a] + QT[a], end) - 1;
    Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
    kb[a] = na_tile_key_begin(c0[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    ke[a] = na_tile_key_end(c1[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    nkt[a] = na_key_tiles(kb[a], ke[a], KT[a]);
  }
  if (empty) return;  // the grid covers the group with the most tiles; the same for the whole block
}
const int ntiles = nkt[0] * nkt[1] * nkt[2];

NA_SHARED_DECL;
T* Qs = reinterpret_cast<T*>(na_smem);
T* Ks = Qs + BQ * QS;
T* Vs = Ks + 2 * BK * QS;
const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
{
  // padding columns and the rows of absent tokens stay zero for the whole kernel
  uint4* z = reinterpret_cast<uint4*>(na_smem);
  const int nz = (int)((BQ * QS + 2 * BK * QS + 2 * BK * VS) * sizeof(T) / 16);
  for (int i = tid; i < nz; i += 128) z[i] = make_uint4(0u, 0u, 0u, 0u);
}
__syncthreads();

// A key tile: its box [k0, k1) per axis, its class (NA_TILE_SKIP / PARTIAL / FULL; a tile the key
// range truncates is PARTIAL), chk (bit a: axis a needs per-element checks) and tok, the local flat
// index of its first key. Computed once per tile, when it is prefetched.
struct KeyTile {
  int k0[3], k1[3], cls, chk, tok;
};
// flat-index step of one key coordinate along each axis (d_a times the extents of the later axes)
const int kst[3] = {ax[0].d * ax[1].nk * ax[2].nk, ax[1].d * ax[2].nk, ax[2].d};
auto tile_info = [&](int lin, KeyTile& kt) {
  int t[3];
  t[2] = lin % nkt[2];
  t[1] = (lin / nkt[2]) % nkt[1];
  t[0] = lin / (nkt[2] * nkt[1]);
  kt.cls = NA_TILE_FULL;
  kt.chk = 0;
  kt.tok = 0;
  for (int a = 0; a < 3; ++a) {
    kt.k0[a] = kb[a] + t[a] * KT[a];
    kt.k1[a] = na_min(kt.k0[a] + KT[a], ke[a]);
    kt.tok = kt.tok * ax[a].nk + (kt.k0[a] * ax[a].d + g[a] - ax[a].kvoff);
    const int ca = na_tile_class(c0[a], c1[a], kt.k0[a], kt.k1[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    if (ca == NA_TILE_SKIP) kt.cls = NA_TILE_SKIP;
    if (ca == NA_TILE_PARTIAL || kt.k1[a] - kt.k0[a] < KT[a]) {
      if (kt.cls != NA_TILE_SKIP) kt.cls = NA_TILE_PARTIAL;
      kt.chk |= 1 << a;
    }
  }
};
auto next_tile = [&](int lin, KeyTile& kt) -> int {
  for (; lin < ntiles; ++lin) {
    tile_info(lin, kt);
    if (kt.cls != NA_TILE_SKIP) break;
  }
  return lin;
};
const long long kvrow = (long long)HKV;  // rows of key/value between consecutive tokens
const T* kbase = key + ((long long)b * NK * HKV + hk) * D;
const T* vbase = value + ((long long)b * NK * HKV + hk) * DV;
auto load_kv = [&](const KeyTile& kt, int buf) {
  T* kd = Ks + buf * BK * QS;
  T* vd = Vs + buf * BK * VS;
  const int e0 = kt.k1[0] - kt.k0[0], e1 = kt.k1[1] - kt.k0[1], e2 = kt.k1[2] - kt.k0[2];
  for (int i = tid; i < BK * (DCH + DVCH); i += 128) {
    const bool is_k = i < BK * DCH;
    const int j = is_k ? i : i - BK * DCH;
    const int ch_n = is_k ? DCH : DVCH;
    const int r = j / ch_n, ch = j % ch_n;
    const int u2 = r % KT2, u1 = (r / KT2) % KT1, u0 = r / (KT1 * KT2);
    const bool ok = u0 < e0 && u1 < e1 && u2 < e2;
    const long long row = (long long)(kt.tok + u0 * kst[0] + u1 * kst[1] + u2 * kst[2]) * kvrow;
    if (is_k)
      na_cp_async16(kd + r * QS + ch * 8, ok ? (const void*)(kbase + row * D + ch * 8) : (const void*)key, ok);
    else
      na_cp_async16(vd + r * VS + ch * 8, ok ? (const void*)(vbase + row * DV + ch * 8) : (const void*)value, ok);
  }
};

// query rows of this thread: r = warp * 16 + gid (+ 8)
int cq[2][3], ws[2][3], we[2][3];
bool rowok[2];
long long qrow[2];
for (int rr = 0; rr < 2; ++rr) {
  const int r = warp * 16 + gid + rr * 8;
  const int u[3] = {r / (QT1 * QT2), (r / QT2) % QT1, r % QT2};
  rowok[rr] = true;
  long long flat = 0;
  for (int a = 0; a < 3; ++a) {
    cq[rr][a] = c0[a] + u[a];
    rowok[rr] = rowok[rr] && cq[rr][a] <= c1[a];
    ws[rr][a] = na_window_start(cq[rr][a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    we[rr][a] = na_window_end(cq[rr][a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    flat = flat * ax[a].n + (cq[rr][a] * ax[a].d + g[a] - ax[a].qoff);
  }
  qrow[rr] = ((long long)b * N + flat) * H + h;
}

// Q tile -> shared, with the first key tile
for (int i = tid; i < BQ * DCH; i += 128) {
  const int r = i / DCH, ch = i % DCH;
  const int u2 = r % QT2, u1 = (r / QT2) % QT1, u0 = r / (QT1 * QT2);
  const int cc0 = c0[0] + u0, cc1 = c0[1] + u1, cc2 = c0[2] + u2;
  const bool ok = cc0 <= c1[0] && cc1 <= c1[1] && cc2 <= c1[2];
  const long long flat = ((long long)(cc0 * ax[0].d + g[0] - ax[0].qoff) * ax[1].n + (cc1 * ax[1].d + g[1] - ax[1].qoff)) * ax[2].n +
                         (cc2 * ax[2].d + g[2] - ax[2].qoff);
  const long long row = ((long long)b * N + flat) * H + h;
  na_cp_async16(Qs + r * QS + ch * 8, ok ? (const void*)(query + row * D + ch * 8) : (const void*)query, ok);
}
KeyTile tc, tn;  // the current key tile and the next one
int cur = next_tile(0, tc);
if (cur < ntiles) load_kv(tc, 0);
na_cp_commit();
na_cp_wait_all();
__syncthreads();

unsigned qf[DP / 16][4];
{
  const unsigned short* qs = reinterpret_cast<const unsigned short*>(Qs);
  for (int kk = 0; kk < DP / 16; ++kk)
    for (int x = 0; x < 4; ++x) {
      const int r = warp * 16 + gid + (x & 1) * 8;
      const int col = kk * 16 + tig * 2 + (x >> 1) * 8;
      qf[kk][x] = *reinterpret_cast<const unsigned*>(qs + r * QS + col);
    }
}

float o[DVP / 8][4];
for (int jn = 0; jn < DVP / 8; ++jn)
  for (int e = 0; e < 4; ++e) o[jn][e] = 0.f;
float mrow[2] = {NA_NEG_INF, NA_NEG_INF}, lrow[2] = {0.f, 0.f};
const int R = prm[NA_P_RPB];

int buf = 0;
while (cur < ntiles) {
  const int nxt = next_tile(cur + 1, tn);
  if (nxt < ntiles) load_kv(tn, buf ^ 1);
  na_cp_commit();
  na_cp_wait_one();
  __syncthreads();

  const int* k0 = tc.k0;
  const int* k1 = tc.k1;
  const int cls = tc.cls, chk = tc.chk;
  // per row and partial axis, the valid key offsets in the tile: [lo, hi)
  int lo[2][3], hi[2][3];
  for (int rr = 0; rr < 2; ++rr)
    for (int a = 0; a < 3; ++a) {
      lo[rr][a] = rowok[rr] ? ws[rr][a] - k0[a] : -(1 << 30);  // absent rows: never stored, kept finite
      hi[rr][a] = rowok[rr] ? na_min(we[rr][a], k1[a]) - k0[a] : (1 << 30);
    }
  const unsigned short* kbuf = reinterpret_cast<const unsigned short*>(Ks + buf * BK * QS);
  const unsigned short* vbuf = reinterpret_cast<const unsigned short*>(Vs + buf * BK * VS);

  float s[8][4];
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
  for (int j = 0; j < 8; j += 2)
    for (int kk = 0; kk < DP / 16; ++kk) {
      unsigned bf[4];
      na_frag_b_nk<LDSM>(bf, kbuf, QS, j * 8, kk * 16, lane);
      na_mma<T>(s[j], qf[kk], bf);
      na_mma<T>(s[j + 1], qf[kk], bf + 2);
    }
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int rr = e >> 1;
      float x = s[j][e] * scale_log2;
      if (HAS_RPB || cls == NA_TILE_PARTIAL) {
        const int col = j * 8 + tig * 2 + (e & 1);
        const int u[3] = {col / (KT1 * KT2), (col / KT2) % KT1, col % KT2};
        bool ok = true;
        if (cls == NA_TILE_PARTIAL)
          for (int a = 0; a < 3; ++a)
            if (chk & (1 << a)) ok = ok && u[a] >= lo[rr][a] && u[a] < hi[rr][a];
        if (!ok) {
          x = NA_NEG_INF;
        } else if (HAS_RPB && rowok[rr]) {
          const int kc[3] = {k0[0] + u[0], k0[1] + u[1], k0[2] + u[2]};
          const int ri = ((kc[0] - cq[rr][0] + ax[0].K - 1) * (2 * ax[1].K - 1) + (kc[1] - cq[rr][1] + ax[1].K - 1)) * (2 * ax[2].K - 1) +
                         (kc[2] - cq[rr][2] + ax[2].K - 1);
          x += na_f(rpb[(long long)h * R + ri]) * NA_LOG2E;
        }
      }
      s[j][e] = x;
    }
  for (int rr = 0; rr < 2; ++rr) {
    float mx = NA_NEG_INF;
    for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * rr], s[j][2 * rr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mnew = fmaxf(mrow[rr], mx);
    const float muse = mnew == NA_NEG_INF ? 0.f : mnew;
    const float alpha = exp2f(mrow[rr] - muse);
    mrow[rr] = mnew;
    float sum = 0.f;
    for (int j = 0; j < 8; ++j)
      for (int e = 0; e < 2; ++e) {
        const float p = exp2f(s[j][2 * rr + e] - muse);
        s[j][2 * rr + e] = p;
        sum += p;
      }
    lrow[rr] = lrow[rr] * alpha + sum;
    for (int jn = 0; jn < DVP / 8; ++jn) {
      o[jn][2 * rr] *= alpha;
      o[jn][2 * rr + 1] *= alpha;
    }
  }
  for (int kk = 0; kk < 4; ++kk) {
    unsigned af[4];
    af[0] = NaType<T>::pack2(s[2 * kk][0], s[2 * kk][1]);
    af[1] = NaType<T>::pack2(s[2 * kk][2], s[2 * kk][3]);
    af[2] = NaType<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    af[3] = NaType<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    for (int jn = 0; jn < DVP / 8; jn += 2) {
      unsigned bf[4];
      na_frag_b_kn<LDSM>(bf, vbuf, VS, kk * 16, jn * 8, lane);
      na_mma<T>(o[jn], af, bf);
      na_mma<T>(o[jn + 1], af, bf + 2);
    }
  }
  __syncthreads();  // the next iteration loads into the buffer just read
  tc = tn;
  cur = nxt;
  buf ^= 1;
}

for (int rr = 0; rr < 2; ++rr) {
  float l = lrow[rr];
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  if (!rowok[rr]) continue;
  const float inv = 1.f / l;
  for (int jn = 0; jn < DVP / 8; ++jn) {
    const int col = jn * 8 + tig * 2;
    if (col < DV) {
      out[qrow[rr] * DV + col] = NaType<OT>::from_float(o[jn][2 * rr] * inv);
      out[qrow[rr] * DV + col + 1] = NaType<OT>::from_float(o[jn][2 * rr + 1] * inv);
    }
  }
  if (tig == 0) lse[qrow[rr]] = (mrow[rr] + log2f(l)) * NA_LN2;
}
