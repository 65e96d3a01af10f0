// Backward, dQ: the forward's walk (query-tile major, tiling.h) recomputing each probability from
// the saved lse: p = exp(s - lse), ds = p * (dO . v - delta), dq = scale * sum ds * k.
// Inputs: q, k, v, ak, av, rpb, prm, scl as the forward; dout [B, N, H, DV]; lse, delta [B, N, H]
// float32 (delta = rowsum(dO * O) - dlse). Output: dq [B, N, H, D] (T).
// Template: T, DP, DVP, NT as the forward.
constexpr int TK = na_stage_rows(DP, DVP, sizeof(T));
threadgroup T ks[TK * DP];
threadgroup T vs[TK * DVP];

const int tid = int(thread_index_in_threadgroup);
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int D = prm[NA_P_D], DV = prm[NA_P_DV], E = prm[NA_P_E], R = prm[NA_P_RPB];
const bool has_rpb = prm[NA_P_HASRPB] != 0;
const int hk = h / (H / HKV);
const float scale = scl[0];

NaAxis ax[3];
for (int a = 0; a < 3; ++a) ax[a] = na_axis(prm, a);
int g[3], c0[3], c1[3], Lg[3], kb[3], ke[3], text[3], kext[3], nkt[3];
// an empty tile is empty for the whole threadgroup: leaving before any barrier is safe
if (!na_tile_range(ax, int(threadgroup_position_in_grid.x), false, g, c0, c1)) return;
for (int a = 0; a < 3; ++a) {
  Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
  kb[a] = na_tile_key_begin(c0[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
  ke[a] = na_tile_key_end(c1[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
  text[a] = ax[a].tq;
  kext[a] = ax[a].tk;
  nkt[a] = na_key_tiles(kb[a], ke[a], ax[a].tk);
}
int qc[3];
const bool qvalid = na_box_slot(tid, text, c0, c1, qc);
const int qtok = qvalid ? na_token(ax, g, qc, false) : 0;
const long qrow = (long(b) * N + qtok) * H + h;

float qr[DP];
for (int e = 0; e < DP; ++e) qr[e] = (qvalid && e < D) ? float(q[qrow * D + e]) * scale : 0.0f;
float dor[DVP];
for (int e = 0; e < DVP; ++e) dor[e] = (qvalid && e < DV) ? float(dout[qrow * DV + e]) : 0.0f;
const float lq = qvalid ? lse[qrow] : 0.0f;
const float dq_delta = qvalid ? delta[qrow] : 0.0f;
float acc[DP];
for (int e = 0; e < DP; ++e) acc[e] = 0.0f;

const int slots = kext[0] * kext[1] * kext[2];
const int total = nkt[0] * nkt[1] * nkt[2];
for (int kt = 0; kt < total; ++kt) {
  int k0[3], k1[3];
  int rem = kt;
  bool skip = false, full = true;
  for (int a = 2; a >= 0; --a) {
    int j = rem % nkt[a];
    rem /= nkt[a];
    k0[a] = kb[a] + j * ax[a].tk;
    k1[a] = na_min(k0[a] + ax[a].tk, ke[a]) - 1;
    int cls = na_tile_class(c0[a], c1[a], k0[a], k1[a] + 1, Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    skip = skip || cls == NA_TILE_SKIP;
    full = full && cls == NA_TILE_FULL;
  }
  if (skip) continue;  // same decision in every thread
  for (int e = tid; e < slots * DP; e += NT) {
    int r = e / DP, x = e % DP, kc[3];
    bool ok = na_box_slot(r, kext, k0, k1, kc) && x < D;
    ks[e] = ok ? k[((long(b) * NK + na_token(ax, g, kc, true)) * HKV + hk) * D + x] : T(0.0f);
  }
  for (int e = tid; e < slots * DVP; e += NT) {
    int r = e / DVP, x = e % DVP, kc[3];
    bool ok = na_box_slot(r, kext, k0, k1, kc) && x < DV;
    vs[e] = ok ? v[((long(b) * NK + na_token(ax, g, kc, true)) * HKV + hk) * DV + x] : T(0.0f);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (qvalid) {
    for (int r = 0; r < slots; ++r) {
      int kc[3];
      if (!na_box_slot(r, kext, k0, k1, kc)) continue;
      if (!full && !na_in_windows(ax, Lg, qc, kc)) continue;
      float sc = 0.0f;
      for (int x = 0; x < DP; ++x) sc += qr[x] * float(ks[r * DP + x]);
      if (has_rpb) sc += float(rpb[long(h) * R + na_rpb_col(ax, qc, kc)]);
      float p = metal::exp(sc - lq), dp = 0.0f;
      for (int x = 0; x < DVP; ++x) dp += dor[x] * float(vs[r * DVP + x]);
      float ds = p * (dp - dq_delta);
      for (int x = 0; x < DP; ++x) acc[x] += ds * float(ks[r * DP + x]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// additional keys/values: every query sees all of them, no mask
for (int e0 = 0; e0 < E; e0 += TK) {
  const int cnt = na_min(TK, E - e0);
  for (int e = tid; e < cnt * DP; e += NT) {
    int r = e / DP, x = e % DP;
    ks[e] = x < D ? ak[((long(b) * E + e0 + r) * HKV + hk) * D + x] : T(0.0f);
  }
  for (int e = tid; e < cnt * DVP; e += NT) {
    int r = e / DVP, x = e % DVP;
    vs[e] = x < DV ? av[((long(b) * E + e0 + r) * HKV + hk) * DV + x] : T(0.0f);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (qvalid) {
    for (int r = 0; r < cnt; ++r) {
      float sc = 0.0f;
      for (int x = 0; x < DP; ++x) sc += qr[x] * float(ks[r * DP + x]);
      float p = metal::exp(sc - lq), dp = 0.0f;
      for (int x = 0; x < DVP; ++x) dp += dor[x] * float(vs[r * DVP + x]);
      float ds = p * (dp - dq_delta);
      for (int x = 0; x < DP; ++x) acc[x] += ds * float(ks[r * DP + x]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

if (qvalid) {
  for (int x = 0; x < D; ++x) dq[qrow * D + x] = T(acc[x] * scale);
}
