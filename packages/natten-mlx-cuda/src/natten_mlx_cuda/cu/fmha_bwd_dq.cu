// Fused neighborhood attention backward, query side, on the tensor cores (float16/bfloat16): the
// forward's walk (query tile box, its key range in key tiles, double-buffered through cp.async).
// Per warp (16 query rows) and key tile: S = Q K^T, P = exp(S - lse), dP = dO V^T,
// dS = P (dP - delta), dQ += dS K (mma.sync m16n8k16); d_rpb += dS by float32 atomics when HAS_RPB.
// Inputs query [B, N, H, D], key [B, NK, HKV, D], value [B, NK, HKV, DV], d_out [B, N, H, DV],
// lse and delta [B, N, H] float32 (delta = rowsum(d_out * out) - d_lse), rpb, prm, scl.
// Outputs d_query [B, N, H, D] float32 (scaled), d_rpb [H, prod(2K-1)] float32 (zero-initialised).
// Template: T, D, DV, DP, DVP, QT0..2, KT0..2, HAS_RPB, LDSM (B fragments through ldmatrix).
constexpr int BQ = QT0 * QT1 * QT2;
constexpr int BK = KT0 * KT1 * KT2;
static_assert(BQ == 64 && BK == 64, "tiles of 64 queries and 64 keys");
constexpr int QS = DP + 8;
constexpr int VS = DVP + 8;
constexpr int DCH = D / 8, DVCH = DV / 8;
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
  if (empty) return;
}
const int ntiles = nkt[0] * nkt[1] * nkt[2];

NA_SHARED_DECL;
T* Qs = reinterpret_cast<T*>(na_smem);
T* Os = Qs + BQ * QS;  // d_out tile
T* Ks = Os + BQ * VS;
T* Vs = Ks + 2 * BK * QS;
const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
{
  uint4* z = reinterpret_cast<uint4*>(na_smem);
  const int nz = (int)((BQ * QS + BQ * VS + 2 * BK * QS + 2 * BK * VS) * sizeof(T) / 16);
  for (int i = tid; i < nz; i += 128) z[i] = make_uint4(0u, 0u, 0u, 0u);
}
__syncthreads();

// chk (optional): bit a set when axis a needs per-element checks (partial along it, or truncated)
auto tile_class = [&](int lin, int* k0, int* k1, int* chk = nullptr) -> int {
  int t[3];
  int bits = 0;
  t[2] = lin % nkt[2];
  t[1] = (lin / nkt[2]) % nkt[1];
  t[0] = lin / (nkt[2] * nkt[1]);
  int cls = NA_TILE_FULL;
  for (int a = 0; a < 3; ++a) {
    k0[a] = kb[a] + t[a] * KT[a];
    k1[a] = na_min(k0[a] + KT[a], ke[a]);
    const int ca = na_tile_class(c0[a], c1[a], k0[a], k1[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    if (ca == NA_TILE_SKIP) return NA_TILE_SKIP;
    if (ca == NA_TILE_PARTIAL || k1[a] - k0[a] < KT[a]) {
      cls = NA_TILE_PARTIAL;
      bits |= 1 << a;
    }
  }
  if (chk) *chk = bits;
  return cls;
};
auto next_tile = [&](int lin) -> int {
  int k0[3], k1[3];
  while (lin < ntiles && tile_class(lin, k0, k1) == NA_TILE_SKIP) ++lin;
  return lin;
};
auto load_kv = [&](int lin, int buf) {
  int k0[3], k1[3];
  tile_class(lin, k0, k1);
  T* kd = Ks + buf * BK * QS;
  T* vd = Vs + buf * BK * VS;
  for (int i = tid; i < BK * (DCH + DVCH); i += 128) {
    const bool is_k = i < BK * DCH;
    const int j = is_k ? i : i - BK * DCH;
    const int ch_n = is_k ? DCH : DVCH;
    const int r = j / ch_n, ch = j % ch_n;
    const int u2 = r % KT2, u1 = (r / KT2) % KT1, u0 = r / (KT1 * KT2);
    const int kc0 = k0[0] + u0, kc1 = k0[1] + u1, kc2 = k0[2] + u2;
    const bool ok = kc0 < k1[0] && kc1 < k1[1] && kc2 < k1[2];
    const long long flat = ((long long)(kc0 * ax[0].d + g[0] - ax[0].kvoff) * ax[1].nk + (kc1 * ax[1].d + g[1] - ax[1].kvoff)) * ax[2].nk +
                           (kc2 * ax[2].d + g[2] - ax[2].kvoff);
    const long long row = ((long long)b * NK + flat) * HKV + hk;
    if (is_k)
      na_cp_async16(kd + r * QS + ch * 8, ok ? (const void*)(key + row * D + ch * 8) : (const void*)key, ok);
    else
      na_cp_async16(vd + r * VS + ch * 8, ok ? (const void*)(value + row * DV + ch * 8) : (const void*)value, ok);
  }
};

int cq[2][3], ws[2][3], we[2][3];
bool rowok[2];
long long qrow[2];
float lse2[2], dl[2];
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
  lse2[rr] = rowok[rr] ? lse[qrow[rr]] * NA_LOG2E : 0.f;
  dl[rr] = rowok[rr] ? delta[qrow[rr]] : 0.f;
}

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
int cur = next_tile(0);
if (cur < ntiles) load_kv(cur, 0);
na_cp_commit();
na_cp_wait_all();
__syncthreads();

// Q and dO stay in shared memory; their A fragments are read per use (registers hold dQ)
const unsigned short* qs = reinterpret_cast<const unsigned short*>(Qs);
const unsigned short* os = reinterpret_cast<const unsigned short*>(Os);

float dq[DP / 8][4];
for (int jn = 0; jn < DP / 8; ++jn)
  for (int e = 0; e < 4; ++e) dq[jn][e] = 0.f;
const int R = prm[NA_P_RPB];

int buf = 0;
while (cur < ntiles) {
  const int nxt = next_tile(cur + 1);
  if (nxt < ntiles) load_kv(nxt, buf ^ 1);
  na_cp_commit();
  na_cp_wait_one();
  __syncthreads();

  int k0[3], k1[3], chk;
  const int cls = tile_class(cur, k0, k1, &chk);
  // per row and partial axis, the valid key offsets in the tile: [lo, hi)
  int lo[2][3], hi[2][3];
  for (int rr = 0; rr < 2; ++rr)
    for (int a = 0; a < 3; ++a) {
      lo[rr][a] = rowok[rr] ? ws[rr][a] - k0[a] : -(1 << 30);  // absent rows: never stored, kept finite
      hi[rr][a] = rowok[rr] ? na_min(we[rr][a], k1[a]) - k0[a] : (1 << 30);
    }
  const unsigned short* kbuf = reinterpret_cast<const unsigned short*>(Ks + buf * BK * QS);
  const unsigned short* vbuf = reinterpret_cast<const unsigned short*>(Vs + buf * BK * VS);

  float s[8][4], dp[8][4];
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      s[j][e] = 0.f;
      dp[j][e] = 0.f;
    }
  for (int kk = 0; kk < DP / 16; ++kk) {
    unsigned af[4];
    na_frag_a<LDSM>(af, qs, QS, warp * 16, kk * 16, lane);
    for (int j = 0; j < 8; j += 2) {
      unsigned bf[4];
      na_frag_b_nk<LDSM>(bf, kbuf, QS, j * 8, kk * 16, lane);
      na_mma<T>(s[j], af, bf);
      na_mma<T>(s[j + 1], af, bf + 2);
    }
  }
  for (int kk = 0; kk < DVP / 16; ++kk) {
    unsigned af[4];
    na_frag_a<LDSM>(af, os, VS, warp * 16, kk * 16, lane);
    for (int j = 0; j < 8; j += 2) {
      unsigned bf[4];
      na_frag_b_nk<LDSM>(bf, vbuf, VS, j * 8, kk * 16, lane);
      na_mma<T>(dp[j], af, bf);
      na_mma<T>(dp[j + 1], af, bf + 2);
    }
  }
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int rr = e >> 1;
      float x = s[j][e] * scale_log2;
      bool ok = rowok[rr];
      int ri = 0;
      if (HAS_RPB || cls == NA_TILE_PARTIAL) {
        const int col = j * 8 + tig * 2 + (e & 1);
        const int u[3] = {col / (KT1 * KT2), (col / KT2) % KT1, col % KT2};
        if (cls == NA_TILE_PARTIAL)
          for (int a = 0; a < 3; ++a)
            if (chk & (1 << a)) ok = ok && u[a] >= lo[rr][a] && u[a] < hi[rr][a];
        if (HAS_RPB && ok) {
          const int kc[3] = {k0[0] + u[0], k0[1] + u[1], k0[2] + u[2]};
          ri = ((kc[0] - cq[rr][0] + ax[0].K - 1) * (2 * ax[1].K - 1) + (kc[1] - cq[rr][1] + ax[1].K - 1)) * (2 * ax[2].K - 1) +
               (kc[2] - cq[rr][2] + ax[2].K - 1);
          x += na_f(rpb[(long long)h * R + ri]) * NA_LOG2E;
        }
      }
      const float p = ok ? exp2f(x - lse2[rr]) : 0.f;
      const float ds = p * (dp[j][e] - dl[rr]);
      if (HAS_RPB && ok) atomicAdd(d_rpb + (long long)h * R + ri, ds);
      s[j][e] = ds;
    }
  for (int kk = 0; kk < 4; ++kk) {
    unsigned af[4];
    af[0] = NaType<T>::pack2(s[2 * kk][0], s[2 * kk][1]);
    af[1] = NaType<T>::pack2(s[2 * kk][2], s[2 * kk][3]);
    af[2] = NaType<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    af[3] = NaType<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
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

for (int rr = 0; rr < 2; ++rr) {
  if (!rowok[rr]) continue;
  for (int jn = 0; jn < DP / 8; ++jn) {
    const int col = jn * 8 + tig * 2;
    if (col < D) {
      d_query[qrow[rr] * D + col] = dq[jn][2 * rr] * scale;
      d_query[qrow[rr] * D + col + 1] = dq[jn][2 * rr + 1] * scale;
    }
  }
}
