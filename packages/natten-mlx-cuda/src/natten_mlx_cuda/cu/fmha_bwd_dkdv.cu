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
constexpr int BQ = QT0 * QT1 * QT2;
constexpr int BK = KT0 * KT1 * KT2;
static_assert(BQ == 64 && BK == 64, "tiles of 64 queries and 64 keys");
constexpr int QS = DP + 8;
constexpr int VS = DVP + 8;
constexpr int DCH = D / 8, DVCH = DV / 8;
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
  int rem = blockIdx.x;
  int tk[3];
  for (int a = 2; a >= 0; --a) {
    ax[a] = na_axis(prm, a);
    const int per = ax[a].d * ax[a].qtiles;
    tk[a] = rem % per;
    rem /= per;
  }
  bool empty = false;
  for (int a = 0; a < 3; ++a) {
    g[a] = tk[a] / ax[a].qtiles;
    const int first = na_group_first(ax[a].kvoff, ax[a].d, g[a]);
    const int end = na_group_end(ax[a].kvoff, ax[a].nk, ax[a].d, g[a]);
    k0[a] = first + (tk[a] % ax[a].qtiles) * KT[a];
    empty = empty || k0[a] >= end;
    k1[a] = na_min(k0[a] + KT[a], end);
    Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
    qb[a] = na_max(na_query_begin(k0[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal), na_group_first(ax[a].qoff, ax[a].d, g[a]));
    qe[a] = na_min(na_query_end(k1[a] - 1, Lg[a], ax[a].K, ax[a].s, ax[a].causal), na_group_end(ax[a].qoff, ax[a].n, ax[a].d, g[a]));
    none = none || qe[a] <= qb[a];
    nqt[a] = na_key_tiles(qb[a], qe[a], QT[a]);
  }
  if (empty) return;
}
const int nq = none ? 0 : nqt[0] * nqt[1] * nqt[2];
const int total = nq * G;

// this thread's key rows: r = warp * 16 + gid (+ 8)
int kc[2][3], qlo[2][3], qhi[2][3];  // qlo/qhi: the queries (in-group) whose windows hold the row's key
bool keyok[2];
long long krow[2];
for (int rr = 0; rr < 2; ++rr) {
  const int r = warp * 16 + gid + rr * 8;
  const int u[3] = {r / (KT1 * KT2), (r / KT2) % KT1, r % KT2};
  keyok[rr] = true;
  long long flat = 0;
  for (int a = 0; a < 3; ++a) {
    kc[rr][a] = k0[a] + u[a];
    keyok[rr] = keyok[rr] && kc[rr][a] < k1[a];
    qlo[rr][a] = na_query_begin(kc[rr][a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    qhi[rr][a] = na_query_end(kc[rr][a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    flat = flat * ax[a].nk + (kc[rr][a] * ax[a].d + g[a] - ax[a].kvoff);
  }
  krow[rr] = ((long long)b * NK + flat) * HKV + hk;
}

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

// query tile it (head-major: it / nq is the head within the group) -> its box and class
// chk (optional): bit a set when axis a needs per-element checks
auto qtile = [&](int it, int* c0, int* c1, int* chk = nullptr) -> int {
  const int lin = it % nq;
  int bits = 0;
  int t[3];
  t[2] = lin % nqt[2];
  t[1] = (lin / nqt[2]) % nqt[1];
  t[0] = lin / (nqt[2] * nqt[1]);
  int cls = NA_TILE_FULL;
  for (int a = 0; a < 3; ++a) {
    c0[a] = qb[a] + t[a] * QT[a];
    c1[a] = na_min(c0[a] + QT[a], qe[a]) - 1;
    const int ca = na_tile_class(c0[a], c1[a], k0[a], k1[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    if (ca == NA_TILE_SKIP) return NA_TILE_SKIP;
    if (ca == NA_TILE_PARTIAL) {
      cls = NA_TILE_PARTIAL;
      bits |= 1 << a;
    }
  }
  if (chk) *chk = bits;
  return cls;
};
auto next_it = [&](int it) -> int {
  int c0[3], c1[3];
  while (it < total && qtile(it, c0, c1) == NA_TILE_SKIP) ++it;
  return it;
};
auto load_q = [&](int it, int buf) {
  int c0[3], c1[3];
  qtile(it, c0, c1);
  const int h = hk * G + it / nq;
  T* qd = Qs + buf * BQ * QS;
  T* od = Os + buf * BQ * VS;
  for (int i = tid; i < BQ * (DCH + DVCH + 1); i += 128) {
    const int kind = i < BQ * DCH ? 0 : (i < BQ * (DCH + DVCH) ? 1 : 2);
    const int j = kind == 0 ? i : (kind == 1 ? i - BQ * DCH : i - BQ * (DCH + DVCH));
    const int ch_n = kind == 0 ? DCH : (kind == 1 ? DVCH : 1);
    const int r = j / ch_n, ch = j % ch_n;
    const int u2 = r % QT2, u1 = (r / QT2) % QT1, u0 = r / (QT1 * QT2);
    const int cc0 = c0[0] + u0, cc1 = c0[1] + u1, cc2 = c0[2] + u2;
    const bool ok = cc0 <= c1[0] && cc1 <= c1[1] && cc2 <= c1[2];
    const long long flat = ((long long)(cc0 * ax[0].d + g[0] - ax[0].qoff) * ax[1].n + (cc1 * ax[1].d + g[1] - ax[1].qoff)) * ax[2].n +
                           (cc2 * ax[2].d + g[2] - ax[2].qoff);
    const long long row = ((long long)b * N + flat) * H + h;
    if (kind == 0)
      na_cp_async16(qd + r * QS + ch * 8, ok ? (const void*)(query + row * D + ch * 8) : (const void*)query, ok);
    else if (kind == 1)
      na_cp_async16(od + r * VS + ch * 8, ok ? (const void*)(d_out + row * DV + ch * 8) : (const void*)d_out, ok);
    else {
      Ls[buf * BQ + r] = ok ? lse[row] * NA_LOG2E : -NA_NEG_INF;
      Ds[buf * BQ + r] = ok ? delta[row] : 0.f;
    }
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
int cur = next_it(0);
if (cur < total) load_q(cur, 0);
na_cp_commit();
na_cp_wait_all();
__syncthreads();

// K and V stay in shared memory; their A fragments are read per use (registers hold dK and dV)
const unsigned short* ks = reinterpret_cast<const unsigned short*>(Ks);
const unsigned short* vs = reinterpret_cast<const unsigned short*>(Vs);
float dk[DP / 8][4], dv[DVP / 8][4];
for (int jn = 0; jn < DP / 8; ++jn)
  for (int e = 0; e < 4; ++e) dk[jn][e] = 0.f;
for (int jn = 0; jn < DVP / 8; ++jn)
  for (int e = 0; e < 4; ++e) dv[jn][e] = 0.f;
const int R = prm[NA_P_RPB];

int buf = 0;
while (cur < total) {
  const int nxt = next_it(cur + 1);
  if (nxt < total) load_q(nxt, buf ^ 1);
  na_cp_commit();
  na_cp_wait_one();
  __syncthreads();

  int c0[3], c1[3], chk;
  const int cls = qtile(cur, c0, c1, &chk);
  const int h = hk * G + cur / nq;
  const unsigned short* qbuf = reinterpret_cast<const unsigned short*>(Qs + buf * BQ * QS);
  const unsigned short* obuf = reinterpret_cast<const unsigned short*>(Os + buf * BQ * VS);
  const float* lbuf = Ls + buf * BQ;
  const float* dbuf = Ds + buf * BQ;

  float s[8][4], dp[8][4];
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      s[j][e] = 0.f;
      dp[j][e] = 0.f;
    }
  for (int kk = 0; kk < DP / 16; ++kk) {
    unsigned af[4];
    na_frag_a<LDSM>(af, ks, QS, warp * 16, kk * 16, lane);
    for (int j = 0; j < 8; j += 2) {
      unsigned bf[4];
      na_frag_b_nk<LDSM>(bf, qbuf, QS, j * 8, kk * 16, lane);
      na_mma<T>(s[j], af, bf);
      na_mma<T>(s[j + 1], af, bf + 2);
    }
  }
  for (int kk = 0; kk < DVP / 16; ++kk) {
    unsigned af[4];
    na_frag_a<LDSM>(af, vs, VS, warp * 16, kk * 16, lane);
    for (int j = 0; j < 8; j += 2) {
      unsigned bf[4];
      na_frag_b_nk<LDSM>(bf, obuf, VS, j * 8, kk * 16, lane);
      na_mma<T>(dp[j], af, bf);
      na_mma<T>(dp[j + 1], af, bf + 2);
    }
  }
  // P^T and dS^T as packed A fragments right away (halves the live registers before the two mma loops)
  unsigned pf[4][4], sf[4][4];
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int rr = e >> 1;
      const int col = j * 8 + tig * 2 + (e & 1);
      float x = s[j][e] * scale_log2;
      bool ok = true;
      if (HAS_RPB || cls == NA_TILE_PARTIAL) {
        const int cqv[3] = {c0[0] + col / (QT1 * QT2), c0[1] + (col / QT2) % QT1, c0[2] + col % QT2};
        if (cls == NA_TILE_PARTIAL)
          for (int a = 0; a < 3; ++a)
            if (chk & (1 << a)) ok = ok && cqv[a] >= qlo[rr][a] && cqv[a] < qhi[rr][a];
        if (HAS_RPB && ok && cqv[0] <= c1[0] && cqv[1] <= c1[1] && cqv[2] <= c1[2]) {
          const int ri = ((kc[rr][0] - cqv[0] + ax[0].K - 1) * (2 * ax[1].K - 1) + (kc[rr][1] - cqv[1] + ax[1].K - 1)) * (2 * ax[2].K - 1) +
                         (kc[rr][2] - cqv[2] + ax[2].K - 1);
          x += na_f(rpb[(long long)h * R + ri]) * NA_LOG2E;
        }
      }
      const float p = ok ? exp2f(x - lbuf[col]) : 0.f;
      s[j][e] = p;
      dp[j][e] = p * (dp[j][e] - dbuf[col]);
      if (e & 1) {  // A fragment register of (query subtile pair j / 2, rows rr, queries j % 2)
        pf[j >> 1][(j & 1) * 2 + rr] = NaType<T>::pack2(s[j][e - 1], s[j][e]);
        sf[j >> 1][(j & 1) * 2 + rr] = NaType<T>::pack2(dp[j][e - 1], dp[j][e]);
      }
    }
  for (int kk = 0; kk < 4; ++kk) {
    for (int jn = 0; jn < DVP / 8; jn += 2) {
      unsigned bf[4];
      na_frag_b_kn<LDSM>(bf, obuf, VS, kk * 16, jn * 8, lane);
      na_mma<T>(dv[jn], pf[kk], bf);
      na_mma<T>(dv[jn + 1], pf[kk], bf + 2);
    }
    for (int jn = 0; jn < DP / 8; jn += 2) {
      unsigned bf[4];
      na_frag_b_kn<LDSM>(bf, qbuf, QS, kk * 16, jn * 8, lane);
      na_mma<T>(dk[jn], sf[kk], bf);
      na_mma<T>(dk[jn + 1], sf[kk], bf + 2);
    }
  }
  __syncthreads();
  cur = nxt;
  buf ^= 1;
}

for (int rr = 0; rr < 2; ++rr) {
  if (!keyok[rr]) continue;
  for (int jn = 0; jn < DP / 8; ++jn) {
    const int col = jn * 8 + tig * 2;
    if (col < D) {
      d_key[krow[rr] * D + col] = dk[jn][2 * rr] * scale;
      d_key[krow[rr] * D + col + 1] = dk[jn][2 * rr + 1] * scale;
    }
  }
  for (int jn = 0; jn < DVP / 8; ++jn) {
    const int col = jn * 8 + tig * 2;
    if (col < DV) {
      d_value[krow[rr] * DV + col] = dv[jn][2 * rr];
      d_value[krow[rr] * DV + col + 1] = dv[jn][2 * rr + 1];
    }
  }
}
