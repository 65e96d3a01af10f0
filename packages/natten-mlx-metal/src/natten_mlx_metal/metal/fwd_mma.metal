// Fused forward on simdgroup matrices: the walk of fwd.metal (query tile box, staged key tiles,
// skipped / full / partial tiles, online softmax), with each simdgroup owning 8 query rows of the
// tile and computing S = Q K^T and O += P V by 8x8 simdgroup_multiply_accumulate in float.
// Fragments are filled through thread_elements() in Apple's lane layout (as MLX's steel
// attention: lane l holds row (q & 4) + (l / 2) % 4, columns (q & 2) * 2 + (l % 2) * 2 and the
// next one, q = l / 4), so the 4 lanes of a row differ in lane bits 0 and 3: row reductions are
// simd_shuffle_xor by 1 and 8.
// Inputs, outputs and template as fwd.metal; NT = 4 * (queries per tile): 32 threads per 8 rows.
constexpr int TK = na_stage_rows(DP, DVP, sizeof(T));
threadgroup T ks[TK * DP];
threadgroup T vs[TK * DVP];
threadgroup int krow[TK * 4];  // per staged key: in-group coordinates per axis, local token (-1: none)

const int tid = int(thread_index_in_threadgroup);
const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
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
if (!na_tile_range(ax, int(threadgroup_position_in_grid.x), false, g, c0, c1)) return;
for (int a = 0; a < 3; ++a) {
  Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
  kb[a] = na_tile_key_begin(c0[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
  ke[a] = na_tile_key_end(c1[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
  text[a] = ax[a].tq;
  kext[a] = ax[a].tk;
  nkt[a] = na_key_tiles(kb[a], ke[a], ax[a].tk);
}
const int fq = lane / 4;
const int fr = (fq & 4) + (lane / 2) % 4;    // this lane's row in every fragment
const int fc = (fq & 2) * 2 + (lane % 2) * 2;  // its first column (it holds fc and fc + 1)
int qc[3];
const bool qvalid = na_box_slot(sg * 8 + fr, text, c0, c1, qc);
const int qtok = qvalid ? na_token(ax, g, qc, false) : 0;
const long qrow = (long(b) * N + qtok) * H + h;
int ws[3], we[3];  // this lane's query window per axis: the mask of partial tiles is 6 comparisons
for (int a = 0; a < 3; ++a) {
  ws[a] = na_window_start(qvalid ? qc[a] : c0[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
  we[a] = na_window_end(qvalid ? qc[a] : c0[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
}

float2 qf[DP / 8];   // this lane's elements of the Q, O and S fragments
float2 of[DVP / 8];
float2 sf[TK / 8];
for (int kk = 0; kk < DP / 8; ++kk) {
  for (int e = 0; e < 2; ++e) {
    int x = kk * 8 + fc + e;
    qf[kk][e] = (qvalid && x < D) ? float(q[qrow * D + x]) * scale : 0.0f;
  }
}
for (int n = 0; n < DVP / 8; ++n) {
  of[n][0] = 0.0f;
  of[n][1] = 0.0f;
}
float m = -INFINITY, l = 0.0f;

// S = Q K^T over the staged rows, masked (mask == false: every staged row is a key of every window)
// then one online-softmax step and O += P V. Collectives: every lane of the simdgroup runs this.
#define NA_MMA_STEP(KEY_OK)                                                                       \
  for (int j = 0; j < TK / 8; ++j) {                                                              \
    sf[j][0] = 0.0f;                                                            \
    sf[j][1] = 0.0f;                                                            \
    for (int kk = 0; kk < DP / 8; ++kk) {                                                         \
      float2 kt = float2(float(ks[(j * 8 + fc) * DP + kk * 8 + fr]),                              \
                         float(ks[(j * 8 + fc + 1) * DP + kk * 8 + fr]));                         \
      sf[j] = na_mma(qf[kk], kt, sf[j]);                                                          \
    }                                                                                             \
  }                                                                                               \
  float rmax = -INFINITY;                                                                         \
  for (int j = 0; j < TK / 8; ++j) {                                                              \
    for (int e = 0; e < 2; ++e) {                                                                 \
      int r = j * 8 + fc + e;                                                                     \
      float s = sf[j][e];                                                       \
      KEY_OK                                                                                      \
      sf[j][e] = s;                                                             \
      rmax = metal::max(rmax, s);                                                                 \
    }                                                                                             \
  }                                                                                               \
  rmax = metal::max(rmax, simd_shuffle_xor(rmax, 1));                                             \
  rmax = metal::max(rmax, simd_shuffle_xor(rmax, 8));                                             \
  const float mn = metal::max(m, rmax);                                                           \
  const float alpha = mn == -INFINITY ? 1.0f : metal::exp(m - mn);                                \
  float rsum = 0.0f;                                                                              \
  for (int j = 0; j < TK / 8; ++j) {                                                              \
    for (int e = 0; e < 2; ++e) {                                                                 \
      float s = sf[j][e];                                                       \
      float p = s == -INFINITY ? 0.0f : metal::exp(s - mn);                                       \
      sf[j][e] = p;                                                             \
      rsum += p;                                                                                  \
    }                                                                                             \
  }                                                                                               \
  rsum += simd_shuffle_xor(rsum, 1);                                                              \
  rsum += simd_shuffle_xor(rsum, 8);                                                              \
  l = l * alpha + rsum;                                                                           \
  m = mn;                                                                                         \
  for (int n = 0; n < DVP / 8; ++n) {                                                             \
    of[n][0] *= alpha;                                                          \
    of[n][1] *= alpha;                                                          \
    for (int j = 0; j < TK / 8; ++j) {                                                            \
      float2 vt = float2(float(vs[(j * 8 + fr) * DVP + n * 8 + fc]),                              \
                         float(vs[(j * 8 + fr) * DVP + n * 8 + fc + 1]));                         \
      of[n] = na_mma(sf[j], vt, of[n]);                                                           \
    }                                                                                             \
  }

const int slots = kext[0] * kext[1] * kext[2];
const int total = nkt[0] * nkt[1] * nkt[2];
for (int kt0 = 0; kt0 < total; ++kt0) {
  int k0[3], k1[3];
  int rem = kt0;
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
  // the tile's key rows once (coordinates, token), so staging and masks do no index arithmetic
  for (int r = tid; r < TK; r += NT) {
    int kc[3];
    bool ok = r < slots && na_box_slot(r, kext, k0, k1, kc);
    for (int a = 0; a < 3; ++a) krow[r * 4 + a] = kc[a];
    krow[r * 4 + 3] = ok ? na_token(ax, g, kc, true) : -1;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = tid; e < TK * DP; e += NT) {
    int r = e / DP, x = e % DP, tok = krow[r * 4 + 3];
    ks[e] = (tok >= 0 && x < D) ? k[((long(b) * NK + tok) * HKV + hk) * D + x] : T(0.0f);
  }
  for (int e = tid; e < TK * DVP; e += NT) {
    int r = e / DVP, x = e % DVP, tok = krow[r * 4 + 3];
    vs[e] = (tok >= 0 && x < DV) ? v[((long(b) * NK + tok) * HKV + hk) * DV + x] : T(0.0f);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  NA_MMA_STEP(
    int kc[3];
    for (int a = 0; a < 3; ++a) kc[a] = krow[r * 4 + a];
    bool ok = qvalid && krow[r * 4 + 3] >= 0;
    if (!full) {
      for (int a = 0; a < 3; ++a) ok = ok && kc[a] >= ws[a] && kc[a] < we[a];
    }
    if (ok && has_rpb) s += float(rpb[long(h) * R + na_rpb_col(ax, qc, kc)]);
    s = ok ? s : -INFINITY;
  )
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// additional keys/values: every query sees all of them, no mask
for (int e0 = 0; e0 < E; e0 += TK) {
  const int cnt = na_min(TK, E - e0);
  for (int e = tid; e < TK * DP; e += NT) {
    int r = e / DP, x = e % DP;
    ks[e] = (r < cnt && x < D) ? ak[((long(b) * E + e0 + r) * HKV + hk) * D + x] : T(0.0f);
  }
  for (int e = tid; e < TK * DVP; e += NT) {
    int r = e / DVP, x = e % DVP;
    vs[e] = (r < cnt && x < DV) ? av[((long(b) * E + e0 + r) * HKV + hk) * DV + x] : T(0.0f);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  NA_MMA_STEP(
    s = (qvalid && r < cnt) ? s : -INFINITY;
  )
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
#undef NA_MMA_STEP

if (qvalid) {
  for (int n = 0; n < DVP / 8; ++n) {
    for (int e = 0; e < 2; ++e) {
      int x = n * 8 + fc + e;
      if (x < DV) out[qrow * DV + x] = T(of[n][e] / l);
    }
  }
  if (fc == 0) lse[qrow] = m + metal::log(l);  // one lane of the row's four
}
