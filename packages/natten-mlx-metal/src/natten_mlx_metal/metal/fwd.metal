// Fused forward, query-tile major (the tier's algorithm, tiling.h's walk): one threadgroup per
// (query tile, head, batch), one thread per query of the tile box. The key range of the tile is
// walked in key tiles staged in threadgroup memory; a key tile outside every window is skipped,
// one inside every window needs no per-element mask; softmax is online, in float32.
// Inputs: q [B, N, H, D], k [B, NK, HKV, D], v [B, NK, HKV, DV], ak [B, E, HKV, D],
// av [B, E, HKV, DV] (8 zeros when E == 0), rpb [H, R] (8 zeros without rpb), prm (common.h), scl [1].
// Outputs: out [B, N, H, DV] (T), lse [B, N, H] float32, natural log.
// Template: T (element type), DP, DVP (head dims rounded up: register arrays), NT (threads).
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
float acc[DVP];
for (int e = 0; e < DVP; ++e) acc[e] = 0.0f;
float m = -INFINITY, l = 0.0f;

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
      float mn = metal::max(m, sc);
      float alpha = metal::exp(m - mn), p = metal::exp(sc - mn);
      l = l * alpha + p;
      for (int x = 0; x < DVP; ++x) acc[x] = acc[x] * alpha + p * float(vs[r * DVP + x]);
      m = mn;
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
      float mn = metal::max(m, sc);
      float alpha = metal::exp(m - mn), p = metal::exp(sc - mn);
      l = l * alpha + p;
      for (int x = 0; x < DVP; ++x) acc[x] = acc[x] * alpha + p * float(vs[r * DVP + x]);
      m = mn;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

if (qvalid) {
  for (int x = 0; x < DV; ++x) out[qrow * DV + x] = T(acc[x] / l);
  lse[qrow] = m + metal::log(l);
}
