// Split op av, and the query gradient of qk: one thread per (query, head, batch).
// out[b, i, h] = c * (sum over the valid slots j of query i's window of w[b, i, h, j] *
// y[b, key(i, j), hk] + sum over the additional tokens e of w[b, i, h, KT + e] * ye[b, e, hk]).
// Weights of invalid slots are never read (a -inf or NaN there changes nothing).
// av: w = attn, y = value, ye = additional values, c = 1. qk's backward: w = dScores, y = key,
// ye = additional keys, c = scale (prm's DV is then D).
// Inputs: w [B, N, H, KT + E], y [B, NK, HKV, DV], ye [B, E, HKV, DV] (8 zeros when E == 0), prm,
// scl [2] = (c, unused). Output: out [B, N, H, DV] (T). Template: T, DP, DVP (DV rounded up), NT.
const int t = int(thread_position_in_grid.x);
const int h = int(thread_position_in_grid.y);
const int b = int(thread_position_in_grid.z);
const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int DV = prm[NA_P_DV], E = prm[NA_P_E];
if (t >= N) return;  // no barriers here
const int hk = h / (H / HKV);
const float cs = scl[0];
NaAxis ax[3];
for (int a = 0; a < 3; ++a) ax[a] = na_axis(prm, a);
int g[3], c[3], Lg[3], ws[3], we[3];
na_query_window(ax, t, g, c, Lg, ws, we);
const int KT = ax[0].K * ax[1].K * ax[2].K;
const long qrow = (long(b) * N + t) * H + h;
const long wrow = qrow * (KT + E);
float acc[DVP];
for (int e = 0; e < DVP; ++e) acc[e] = 0.0f;
for (int j = 0; j < KT; ++j) {
  int kc[3];
  int rem = j;
  bool valid = true;
  for (int a = 2; a >= 0; --a) {
    kc[a] = ws[a] + rem % ax[a].K;
    rem /= ax[a].K;
    valid = valid && kc[a] < we[a];
  }
  if (!valid) continue;
  const float p = float(w[wrow + j]);
  const long krow = (long(b) * NK + na_token(ax, g, kc, true)) * HKV + hk;
  for (int e = 0; e < DV; ++e) acc[e] += p * float(y[krow * DV + e]);
}
for (int m = 0; m < E; ++m) {
  const float p = float(w[wrow + KT + m]);
  const long erow = (long(b) * E + m) * HKV + hk;
  for (int e = 0; e < DV; ++e) acc[e] += p * float(ye[erow * DV + e]);
}
for (int e = 0; e < DV; ++e) out[qrow * DV + e] = T(acc[e] * cs);
