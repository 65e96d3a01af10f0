// Backward, dK and dV: key-tile major. One threadgroup per (key tile, kv head, batch), one thread
// per key of the tile box. The queries whose windows meet the key tile are the in-group range
// [na_query_begin(k0), na_query_end(k1)) per axis (tiling.h), cut to the local query slab; they
// are staged in query tiles (q, dO, lse, delta), tiles outside every window skipped, masks only
// on partial tiles. Every query head of the kv head's group is walked here, so no atomics.
// Inputs: q [B, N, H, D], k [B, NK, HKV, D], v [B, NK, HKV, DV], rpb [H, R] (8 zeros without),
// dout [B, N, H, DV], lse, delta [B, N, H] float32, prm (tiles = key tiles per group), scl [1].
// Outputs: dk [B, NK, HKV, D], dv [B, NK, HKV, DV] (T). Template: T, DP, DVP, NT.
constexpr int TQ = na_stage_rows(DP, DVP, sizeof(T));
threadgroup T qs[TQ * DP];
threadgroup T dos[TQ * DVP];
threadgroup float ls[TQ];
threadgroup float dls[TQ];

const int tid = int(thread_index_in_threadgroup);
const int hk = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int D = prm[NA_P_D], DV = prm[NA_P_DV], R = prm[NA_P_RPB];
const bool has_rpb = prm[NA_P_HASRPB] != 0;
const int G = H / HKV;
const float scale = scl[0];

NaAxis ax[3];
for (int a = 0; a < 3; ++a) ax[a] = na_axis(prm, a);
int g[3], k0[3], k1[3], Lg[3], qb[3], qe[3], text[3], kext[3], nqt[3];
if (!na_tile_range(ax, int(threadgroup_position_in_grid.x), true, g, k0, k1)) return;
for (int a = 0; a < 3; ++a) {
  Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
  qb[a] = na_max(na_query_begin(k0[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal), na_group_first(ax[a].qoff, ax[a].d, g[a]));
  qe[a] = na_min(na_query_end(k1[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal),
                 na_group_end(ax[a].qoff, ax[a].n, ax[a].d, g[a]));
  text[a] = ax[a].tq;
  kext[a] = ax[a].tk;
  nqt[a] = na_key_tiles(qb[a], qe[a], ax[a].tq);  // tiles of T coordinates covering [qb, qe)
}
int kc[3];
const bool kvalid = na_box_slot(tid, kext, k0, k1, kc);
const int ktok = kvalid ? na_token(ax, g, kc, true) : 0;
const long krow = (long(b) * NK + ktok) * HKV + hk;
float kr[DP], vr[DVP], gk[DP], gv[DVP];  // gk, gv: the gradients
for (int e = 0; e < DP; ++e) {
  kr[e] = (kvalid && e < D) ? float(k[krow * D + e]) : 0.0f;
  gk[e] = 0.0f;
}
for (int e = 0; e < DVP; ++e) {
  vr[e] = (kvalid && e < DV) ? float(v[krow * DV + e]) : 0.0f;
  gv[e] = 0.0f;
}

const int slots = text[0] * text[1] * text[2];
const int total = nqt[0] * nqt[1] * nqt[2];
for (int h = hk * G; h < (hk + 1) * G; ++h) {
  for (int qt = 0; qt < total; ++qt) {
    int q0[3], q1[3];
    int rem = qt;
    bool skip = false, full = true;
    for (int a = 2; a >= 0; --a) {
      int j = rem % nqt[a];
      rem /= nqt[a];
      q0[a] = qb[a] + j * ax[a].tq;
      q1[a] = na_min(q0[a] + ax[a].tq, qe[a]) - 1;
      int cls = na_tile_class(q0[a], q1[a], k0[a], k1[a] + 1, Lg[a], ax[a].K, ax[a].s, ax[a].causal);
      skip = skip || cls == NA_TILE_SKIP;
      full = full && cls == NA_TILE_FULL;
    }
    if (skip) continue;  // same decision in every thread
    for (int e = tid; e < slots * DP; e += NT) {
      int r = e / DP, x = e % DP, qc[3];
      bool ok = na_box_slot(r, text, q0, q1, qc) && x < D;
      qs[e] = ok ? q[((long(b) * N + na_token(ax, g, qc, false)) * H + h) * D + x] : T(0.0f);
    }
    for (int e = tid; e < slots * DVP; e += NT) {
      int r = e / DVP, x = e % DVP, qc[3];
      bool ok = na_box_slot(r, text, q0, q1, qc) && x < DV;
      dos[e] = ok ? dout[((long(b) * N + na_token(ax, g, qc, false)) * H + h) * DV + x] : T(0.0f);
    }
    for (int e = tid; e < slots; e += NT) {
      int qc[3];
      bool ok = na_box_slot(e, text, q0, q1, qc);
      long row = ok ? (long(b) * N + na_token(ax, g, qc, false)) * H + h : 0;
      ls[e] = ok ? float(lse[row]) : 0.0f;
      dls[e] = ok ? float(delta[row]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (kvalid) {
      for (int r = 0; r < slots; ++r) {
        int qc[3];
        if (!na_box_slot(r, text, q0, q1, qc)) continue;
        if (!full && !na_in_windows(ax, Lg, qc, kc)) continue;
        float sc = 0.0f, dp = 0.0f;
        for (int x = 0; x < DP; ++x) sc += float(qs[r * DP + x]) * kr[x];
        sc *= scale;
        if (has_rpb) sc += float(rpb[long(h) * R + na_rpb_col(ax, qc, kc)]);
        float p = metal::exp(sc - ls[r]);
        for (int x = 0; x < DVP; ++x) {
          float o = float(dos[r * DVP + x]);
          dp += o * vr[x];
          gv[x] += p * o;
        }
        float ds = p * (dp - dls[r]) * scale;
        for (int x = 0; x < DP; ++x) gk[x] += ds * float(qs[r * DP + x]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
if (kvalid) {
  for (int x = 0; x < D; ++x) dk[krow * D + x] = T(gk[x]);
  for (int x = 0; x < DV; ++x) dv[krow * DV + x] = T(gv[x]);
}
