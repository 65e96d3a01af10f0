// The key-side gradients of the split ops, key major: one thread per (key, kv head, batch), no
// atomics. out[b, j, hk] = c * sum over the (query i, head h of hk's group, slot s) with
// key(i, s) = j of w[b, i, h, s] * x[b, i, h]. The queries whose windows hold key j are the
// in-group range [na_query_begin(kc), na_query_end(kc)) per axis (tiling.h), cut to the local
// query slab; both window ends are non-decreasing, so every query of that box holds j, in slot
// kc - na_window_start(qc) per axis. qk's dK: w = dScores, x = query, c = scale (prm's DV is D);
// av's dV: w = attn, x = dO, c = 1.
// Inputs: w [B, N, H, KT + E], x [B, N, H, DV], prm, scl [2] = (c, unused).
// Output: out [B, NK, HKV, DV] (T). Template: T, DP, DVP, NT.
const int t = int(thread_position_in_grid.x);
const int hk = int(thread_position_in_grid.y);
const int b = int(thread_position_in_grid.z);
const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int DV = prm[NA_P_DV], E = prm[NA_P_E];
if (t >= NK) return;  // no barriers here
const int G = H / HKV;
const float cs = scl[0];
NaAxis ax[3];
for (int a = 0; a < 3; ++a) ax[a] = na_axis(prm, a);
int g[3], kc[3], Lg[3], qb[3], qn[3];
int rem = t;
for (int a = 2; a >= 0; --a) {
  int gi = rem % ax[a].nk + ax[a].kvoff;
  rem /= ax[a].nk;
  g[a] = gi % ax[a].d;
  kc[a] = gi / ax[a].d;
  Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
  qb[a] = na_max(na_query_begin(kc[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal),
                 na_group_first(ax[a].qoff, ax[a].d, g[a]));
  int qe = na_min(na_query_end(kc[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal),
                  na_group_end(ax[a].qoff, ax[a].n, ax[a].d, g[a]));
  qn[a] = na_max(qe - qb[a], 0);
}
const int KT = ax[0].K * ax[1].K * ax[2].K;
float acc[DVP];
for (int e = 0; e < DVP; ++e) acc[e] = 0.0f;
const int total = qn[0] * qn[1] * qn[2];
for (int r = 0; r < total; ++r) {
  int qc[3];
  int rr = r, slot = 0;
  for (int a = 2; a >= 0; --a) {
    qc[a] = qb[a] + rr % qn[a];
    rr /= qn[a];
  }
  for (int a = 0; a < 3; ++a)
    slot = slot * ax[a].K + kc[a] - na_window_start(qc[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
  const long q0 = (long(b) * N + na_token(ax, g, qc, false)) * H;
  for (int h = hk * G; h < (hk + 1) * G; ++h) {
    const float p = float(w[(q0 + h) * (KT + E) + slot]);
    for (int e = 0; e < DV; ++e) acc[e] += p * float(x[(q0 + h) * DV + e]);
  }
}
const long krow = (long(b) * NK + t) * HKV + hk;
for (int e = 0; e < DV; ++e) out[krow * DV + e] = T(acc[e] * cs);
