// The rpb gradient of the split op qk (rpb is never combined with causal masking): one thread per
// (rpb column, head) sums dScores over every (batch, query) whose key at that relative offset lies
// in the query's window, at most one slot per query; no atomics, no barriers.
// Inputs: w [B, N, H, KT + E] (dScores), prm. Output: drpb [H, R] float32. Template: T, DP, DVP, NT.
const int col = int(thread_position_in_grid.x);
const int h = int(thread_position_in_grid.y);
const int B = prm[NA_P_B], H = prm[NA_P_H], N = prm[NA_P_N], E = prm[NA_P_E], R = prm[NA_P_RPB];
if (col >= R) return;
NaAxis ax[3];
for (int a = 0; a < 3; ++a) ax[a] = na_axis(prm, a);
int off[3];  // relative offset kc - c of this column, per axis
int rem = col;
for (int a = 2; a >= 0; --a) {
  off[a] = rem % (2 * ax[a].K - 1) - (ax[a].K - 1);
  rem /= 2 * ax[a].K - 1;
}
const int KT = ax[0].K * ax[1].K * ax[2].K;
float acc = 0.0f;
for (int t = 0; t < N; ++t) {
  int g[3], c[3], Lg[3], ws[3], we[3];
  na_query_window(ax, t, g, c, Lg, ws, we);
  int slot = 0;
  bool ok = true;
  for (int a = 0; a < 3; ++a) {
    int kc = c[a] + off[a];
    ok = ok && kc >= ws[a] && kc < we[a];
    slot = slot * ax[a].K + (kc - ws[a]);
  }
  if (!ok) continue;
  for (int b = 0; b < B; ++b) acc += float(w[((long(b) * N + t) * H + h) * (KT + E) + slot]);
}
drpb[long(h) * R + col] = acc;
