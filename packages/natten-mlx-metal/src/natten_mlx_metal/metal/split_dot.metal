// Split op qk, and the attention-weight gradient of av: one thread per (query, head, batch).
// out[b, i, h, j] = c * x[b, i, h] . y[b, key(i, j), hk] (+ rpb[h, column of (i, key)]) for the
// valid slots j of query i's window (row-major over the per-axis slots, common.h's
// na_query_window), `fill` for the invalid ones (causal); then out[b, i, h, KT + e] =
// c * x[b, i, h] . ye[b, e, hk] for the additional keys. qk: x = query, y = key, ye = additional
// keys, c = scale, fill = -inf. av's backward: x = dO, y = value, ye = additional values, c = 1,
// fill = 0 (prm's D is then DV).
// Inputs: x [B, N, H, D], y [B, NK, HKV, D], ye [B, E, HKV, D] (8 zeros when E == 0), rpb [H, R]
// (8 zeros without), prm (common.h), scl [2] = (c, fill). Output: out [B, N, H, KT + E] (T).
// Template: T, DP (D rounded up: the register array), DVP, NT (threads).
const int t = int(thread_position_in_grid.x);
const int h = int(thread_position_in_grid.y);
const int b = int(thread_position_in_grid.z);
const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int D = prm[NA_P_D], E = prm[NA_P_E], R = prm[NA_P_RPB];
const bool has_rpb = prm[NA_P_HASRPB] != 0;
// no threadgroup memory and no barriers: threads past the last query may leave at once
if (t >= N) return;
const int hk = h / (H / HKV);
const float cs = scl[0], fill = scl[1];
NaAxis ax[3];
for (int a = 0; a < 3; ++a) ax[a] = na_axis(prm, a);
int g[3], c[3], Lg[3], ws[3], we[3];
na_query_window(ax, t, g, c, Lg, ws, we);
const int KT = ax[0].K * ax[1].K * ax[2].K;
const long qrow = (long(b) * N + t) * H + h;
float xr[DP];
for (int e = 0; e < DP; ++e) xr[e] = e < D ? float(x[qrow * D + e]) : 0.0f;
const long orow = qrow * (KT + E);
for (int j = 0; j < KT; ++j) {
  int kc[3];
  int rem = j;
  bool valid = true;
  for (int a = 2; a >= 0; --a) {
    kc[a] = ws[a] + rem % ax[a].K;
    rem /= ax[a].K;
    valid = valid && kc[a] < we[a];
  }
  if (!valid) {
    out[orow + j] = T(fill);
    continue;
  }
  const long krow = (long(b) * NK + na_token(ax, g, kc, true)) * HKV + hk;
  float sc = 0.0f;
  for (int e = 0; e < D; ++e) sc += xr[e] * float(y[krow * D + e]);
  sc *= cs;
  if (has_rpb) sc += float(rpb[long(h) * R + na_rpb_col(ax, c, kc)]);
  out[orow + j] = T(sc);
}
for (int m = 0; m < E; ++m) {
  const long erow = (long(b) * E + m) * HKV + hk;
  float sc = 0.0f;
  for (int e = 0; e < D; ++e) sc += xr[e] * float(ye[erow * D + e]);
  out[orow + KT + m] = T(sc * cs);
}
