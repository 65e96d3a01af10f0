// Neighborhood attention backward, key side, one thread per (batch, key, kv head): the queries that
// see key kc along an axis are the in-group range [na_query_begin, na_query_end) (tiling.h), cut to
// the local query slab. dv = sum_q p dO_q, dk = scale * sum_q ds q over those queries and the query
// heads sharing this kv head. Inputs as simple_dq; outputs d_key [B, NK, HKV, D], d_value
// [B, NK, HKV, DV], both float32. Template: T, DMAX, HAS_RPB.
const int B = prm[NA_P_B], H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int D = prm[NA_P_D], DV = prm[NA_P_DV];
const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (tid >= (long long)B * NK * HKV) return;
const int hk = (int)(tid % HKV);
const int m = (int)((tid / HKV) % NK);
const int b = (int)(tid / ((long long)HKV * NK));
const int G = H / HKV;
const float scale = scl[0];

NaAxis ax[3];
int g[3], kc[3], qb[3], qe[3];
int rem = m;
int jcoord[3];
for (int a = 2; a >= 0; --a) {
  ax[a] = na_axis(prm, a);
  jcoord[a] = rem % ax[a].nk;
  rem /= ax[a].nk;
}
for (int a = 0; a < 3; ++a) {
  const int gj = jcoord[a] + ax[a].kvoff;
  g[a] = gj % ax[a].d;
  kc[a] = gj / ax[a].d;
  const int Lg = na_group_len(ax[a].L, ax[a].d, g[a]);
  qb[a] = na_max(na_query_begin(kc[a], Lg, ax[a].K, ax[a].s, ax[a].causal), na_group_first(ax[a].qoff, ax[a].d, g[a]));
  qe[a] = na_min(na_query_end(kc[a], Lg, ax[a].K, ax[a].s, ax[a].causal), na_group_end(ax[a].qoff, ax[a].n, ax[a].d, g[a]));
}
const long long key_row = ((long long)b * NK + m) * HKV + hk;
float kv[DMAX], vv[DMAX], dk[DMAX], dv[DMAX];
for (int i = 0; i < DMAX; ++i) {
  kv[i] = i < D ? na_f(key[key_row * D + i]) : 0.f;
  vv[i] = i < DV ? na_f(value[key_row * DV + i]) : 0.f;
  dk[i] = 0.f;
  dv[i] = 0.f;
}
for (int c0 = qb[0]; c0 < qe[0]; ++c0) {
  const int i0 = c0 * ax[0].d + g[0] - ax[0].qoff;
  for (int c1 = qb[1]; c1 < qe[1]; ++c1) {
    const int i1 = c1 * ax[1].d + g[1] - ax[1].qoff;
    for (int c2 = qb[2]; c2 < qe[2]; ++c2) {
      const int i2 = c2 * ax[2].d + g[2] - ax[2].qoff;
      const long long qn = ((long long)i0 * ax[1].n + i1) * ax[2].n + i2;
      float bias = 0.f;
      int r = 0;
      if (HAS_RPB)
        r = ((kc[0] - c0 + ax[0].K - 1) * (2 * ax[1].K - 1) + (kc[1] - c1 + ax[1].K - 1)) * (2 * ax[2].K - 1) +
            (kc[2] - c2 + ax[2].K - 1);
      for (int hh = 0; hh < G; ++hh) {
        const int h = hk * G + hh;
        const long long row = ((long long)b * N + qn) * H + h;
        const T* qp = query + row * D;
        const T* dop = d_out + row * DV;
        float s = 0.f, dp = 0.f;
        for (int i = 0; i < DMAX; ++i)
          if (i < D) s += kv[i] * na_f(qp[i]);
        s *= scale;
        if (HAS_RPB) bias = na_f(rpb[(long long)h * prm[NA_P_RPB] + r]);
        const float p = expf(s + bias - lse[row]);
        for (int i = 0; i < DMAX; ++i)
          if (i < DV) {
            const float o = na_f(dop[i]);
            dp += o * vv[i];
            dv[i] += p * o;
          }
        const float ds = p * (dp - delta[row]) * scale;
        for (int i = 0; i < DMAX; ++i)
          if (i < D) dk[i] += ds * na_f(qp[i]);
      }
    }
  }
}
for (int i = 0; i < D; ++i) d_key[key_row * D + i] = dk[i < DMAX ? i : 0];
for (int i = 0; i < DV; ++i) d_value[key_row * DV + i] = dv[i < DMAX ? i : 0];
