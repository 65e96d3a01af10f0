// Backward, dK and dV, on simdgroup matrices: bwd_dkv.metal's key-major walk (tiling.h's query
// range of the key tile, staged query tiles, skipped / full / partial tiles, all query heads of the
// kv head), with each simdgroup owning 8 key rows of the tile. Per staged query tile, by 8x8
// multiply-accumulates in float: S^T = K Q^T, P^T = exp(scale S^T + bias - lse) (0 where masked),
// dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += scale dS^T Q. Fragments as in
// fwd_mma.metal (rows: keys, columns: queries). No row reductions, no atomics.
// Inputs and outputs as bwd_dkv.metal. Template: T, DP, DVP, NT = 4 * (keys per tile).
constexpr int TQ = na_stage_rows(DP, DVP, sizeof(T));
threadgroup T qs[TQ * DP];
threadgroup T dos[TQ * DVP];
threadgroup float ls[TQ];
threadgroup float dls[TQ];
// per staged query: local token (-1: none), in-group coordinates, window start and end, per axis
threadgroup int qtab[TQ * 10];

const int tid = int(thread_index_in_threadgroup);
const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
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
const int fq = lane / 4;
const int fr = (fq & 4) + (lane / 2) % 4;    // this lane's row (key) in every fragment
const int fc = (fq & 2) * 2 + (lane % 2) * 2;  // its first column (query, or head-dim entry)
int kc[3];
const bool kvalid = na_box_slot(sg * 8 + fr, kext, k0, k1, kc);
const int ktok = kvalid ? na_token(ax, g, kc, true) : 0;
const long krow = (long(b) * NK + ktok) * HKV + hk;

float2 kf[DP / 8], vf[DVP / 8], dkf[DP / 8], dvf[DVP / 8], sf[TQ / 8];
for (int kk = 0; kk < DP / 8; ++kk) {
  for (int e = 0; e < 2; ++e) {
    int x = kk * 8 + fc + e;
    kf[kk][e] = (kvalid && x < D) ? float(k[krow * D + x]) : 0.0f;
  }
  dkf[kk] = float2(0.0f, 0.0f);
}
for (int n = 0; n < DVP / 8; ++n) {
  for (int e = 0; e < 2; ++e) {
    int x = n * 8 + fc + e;
    vf[n][e] = (kvalid && x < DV) ? float(v[krow * DV + x]) : 0.0f;
  }
  dvf[n] = float2(0.0f, 0.0f);
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
    // the tile's query rows once, so staging and masks do no index or window arithmetic
    for (int r = tid; r < TQ; r += NT) {
      int qc[3];
      bool ok = r < slots && na_box_slot(r, text, q0, q1, qc);
      int tok = ok ? na_token(ax, g, qc, false) : -1;
      qtab[r * 10] = tok;
      for (int a = 0; a < 3; ++a) {
        qtab[r * 10 + 1 + a] = qc[a];
        qtab[r * 10 + 4 + a] = ok ? na_window_start(qc[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal) : 0;
        qtab[r * 10 + 7 + a] = ok ? na_window_end(qc[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal) : 0;
      }
      long row = ok ? (long(b) * N + tok) * H + h : 0;
      ls[r] = ok ? float(lse[row]) : 0.0f;
      dls[r] = ok ? float(delta[row]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int e = tid; e < TQ * DP; e += NT) {
      int r = e / DP, x = e % DP, tok = qtab[r * 10];
      qs[e] = (tok >= 0 && x < D) ? q[((long(b) * N + tok) * H + h) * D + x] : T(0.0f);
    }
    for (int e = tid; e < TQ * DVP; e += NT) {
      int r = e / DVP, x = e % DVP, tok = qtab[r * 10];
      dos[e] = (tok >= 0 && x < DV) ? dout[((long(b) * N + tok) * H + h) * DV + x] : T(0.0f);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // S^T = K Q^T, then P^T and dP^T = V dO^T, then dS^T (kept in sf)
    for (int j = 0; j < TQ / 8; ++j) {
      float2 st = float2(0.0f, 0.0f), dpt = float2(0.0f, 0.0f);
      for (int kk = 0; kk < DP / 8; ++kk) {
        float2 qt2 = float2(float(qs[(j * 8 + fc) * DP + kk * 8 + fr]), float(qs[(j * 8 + fc + 1) * DP + kk * 8 + fr]));
        st = na_mma(kf[kk], qt2, st);
      }
      for (int n = 0; n < DVP / 8; ++n) {
        float2 dot2 = float2(float(dos[(j * 8 + fc) * DVP + n * 8 + fr]), float(dos[(j * 8 + fc + 1) * DVP + n * 8 + fr]));
        dpt = na_mma(vf[n], dot2, dpt);
      }
      float2 p2;
      for (int e = 0; e < 2; ++e) {
        int r = j * 8 + fc + e, qc[3];
        bool ok = kvalid && qtab[r * 10] >= 0;
        for (int a = 0; a < 3; ++a) {
          qc[a] = qtab[r * 10 + 1 + a];
          if (!full) ok = ok && kc[a] >= qtab[r * 10 + 4 + a] && kc[a] < qtab[r * 10 + 7 + a];
        }
        float s = st[e] * scale;
        if (ok && has_rpb) s += float(rpb[long(h) * R + na_rpb_col(ax, qc, kc)]);
        float p = ok ? metal::exp(s - ls[r]) : 0.0f;
        p2[e] = p;
        sf[j][e] = p * (dpt[e] - dls[r]) * scale;
      }
      // dV += P^T dO: P^T's column block j against dO rows j*8..j*8+7
      for (int n = 0; n < DVP / 8; ++n) {
        float2 dob = float2(float(dos[(j * 8 + fr) * DVP + n * 8 + fc]), float(dos[(j * 8 + fr) * DVP + n * 8 + fc + 1]));
        dvf[n] = na_mma(p2, dob, dvf[n]);
      }
    }
    // dK += dS^T Q
    for (int kk = 0; kk < DP / 8; ++kk) {
      for (int j = 0; j < TQ / 8; ++j) {
        float2 qb2 = float2(float(qs[(j * 8 + fr) * DP + kk * 8 + fc]), float(qs[(j * 8 + fr) * DP + kk * 8 + fc + 1]));
        dkf[kk] = na_mma(sf[j], qb2, dkf[kk]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
if (kvalid) {
  for (int kk = 0; kk < DP / 8; ++kk) {
    for (int e = 0; e < 2; ++e) {
      int x = kk * 8 + fc + e;
      if (x < D) dk[krow * D + x] = T(dkf[kk][e]);
    }
  }
  for (int n = 0; n < DVP / 8; ++n) {
    for (int e = 0; e < 2; ++e) {
      int x = n * 8 + fc + e;
      if (x < DV) dv[krow * DV + x] = T(dvf[n][e]);
    }
  }
}
