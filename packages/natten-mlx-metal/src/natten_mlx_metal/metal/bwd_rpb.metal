// Backward, gradient of the relative positional bias (rpb is never combined with causal masking).
// One thread per (rpb column, head) sums ds over every (batch, query) whose key at that relative
// offset lies in the query's window: at most one key per query and column, no atomics. No
// threadgroup memory and no barriers, so threads past the last column may return at once.
// Inputs: q [B, N, H, D], k [B, NK, HKV, D], v [B, NK, HKV, DV], rpb [H, R], dout [B, N, H, DV],
// lse, delta [B, N, H] float32, prm, scl [1]. Output: drpb [H, R] float32.
const int col = int(thread_position_in_grid.x);
const int h = int(thread_position_in_grid.y);
const int B = prm[NA_P_B], H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int D = prm[NA_P_D], DV = prm[NA_P_DV], R = prm[NA_P_RPB];
if (col >= R) return;
const int hk = h / (H / HKV);
const float scale = scl[0];
NaAxis ax[3];
for (int a = 0; a < 3; ++a) ax[a] = na_axis(prm, a);
int off[3];  // relative offset kc - c of this column, per axis
int rem = col;
for (int a = 2; a >= 0; --a) {
  off[a] = rem % (2 * ax[a].K - 1) - (ax[a].K - 1);
  rem /= 2 * ax[a].K - 1;
}
const float bias = float(rpb[long(h) * R + col]);
float acc = 0.0f;
for (int b = 0; b < B; ++b) {
  for (int t = 0; t < N; ++t) {
    int g[3], c[3], kc[3], Lg[3];
    int r = t;
    bool ok = true;
    for (int a = 2; a >= 0; --a) {
      int gi = r % ax[a].n + ax[a].qoff;
      r /= ax[a].n;
      g[a] = gi % ax[a].d;
      c[a] = gi / ax[a].d;
      Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
      kc[a] = c[a] + off[a];
      ok = ok && kc[a] >= 0 && kc[a] < Lg[a];
    }
    if (!ok || !na_in_windows(ax, Lg, c, kc)) continue;
    const long qrow = (long(b) * N + t) * H + h;
    const long krow = (long(b) * NK + na_token(ax, g, kc, true)) * HKV + hk;
    float sc = 0.0f, dp = 0.0f;
    for (int x = 0; x < D; ++x) sc += float(q[qrow * D + x]) * float(k[krow * D + x]);
    for (int x = 0; x < DV; ++x) dp += float(dout[qrow * DV + x]) * float(v[krow * DV + x]);
    float p = metal::exp(sc * scale + bias - lse[qrow]);
    acc += p * (dp - delta[qrow]);
  }
}
drpb[long(h) * R + col] = acc;
