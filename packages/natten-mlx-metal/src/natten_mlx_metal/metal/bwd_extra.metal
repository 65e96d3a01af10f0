// Backward, gradients of the additional keys and values. Every query attends to every extra key,
// so one thread per extra key walks all local queries of every head of its kv head's group, staged
// TQ tokens at a time. One threadgroup per (chunk of NT extra keys, kv head, batch).
// Inputs: q [B, N, H, D], ak [B, E, HKV, D], av [B, E, HKV, DV], dout [B, N, H, DV], lse, delta
// [B, N, H] float32, prm, scl [1]. Outputs: dak [B, E, HKV, D], dav [B, E, HKV, DV] (T).
constexpr int TQ = na_stage_rows(DP, DVP, sizeof(T));
threadgroup T qs[TQ * DP];
threadgroup T dos[TQ * DVP];
threadgroup float ls[TQ];
threadgroup float dls[TQ];

const int tid = int(thread_index_in_threadgroup);
const int hk = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N];
const int D = prm[NA_P_D], DV = prm[NA_P_DV], E = prm[NA_P_E];
const int G = H / HKV;
const float scale = scl[0];
const int ei = int(threadgroup_position_in_grid.x) * NT + tid;
const bool valid = ei < E;
const long erow = (long(b) * E + (valid ? ei : 0)) * HKV + hk;
float kr[DP], vr[DVP], gk[DP], gv[DVP];
for (int e = 0; e < DP; ++e) {
  kr[e] = (valid && e < D) ? float(ak[erow * D + e]) : 0.0f;
  gk[e] = 0.0f;
}
for (int e = 0; e < DVP; ++e) {
  vr[e] = (valid && e < DV) ? float(av[erow * DV + e]) : 0.0f;
  gv[e] = 0.0f;
}
for (int h = hk * G; h < (hk + 1) * G; ++h) {
  for (int t0 = 0; t0 < N; t0 += TQ) {
    const int cnt = na_min(TQ, N - t0);
    for (int e = tid; e < cnt * DP; e += NT) {
      int r = e / DP, x = e % DP;
      qs[e] = x < D ? q[((long(b) * N + t0 + r) * H + h) * D + x] : T(0.0f);
    }
    for (int e = tid; e < cnt * DVP; e += NT) {
      int r = e / DVP, x = e % DVP;
      dos[e] = x < DV ? dout[((long(b) * N + t0 + r) * H + h) * DV + x] : T(0.0f);
    }
    for (int e = tid; e < cnt; e += NT) {
      long row = (long(b) * N + t0 + e) * H + h;
      ls[e] = lse[row];
      dls[e] = delta[row];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (valid) {
      for (int r = 0; r < cnt; ++r) {
        float sc = 0.0f, dp = 0.0f;
        for (int x = 0; x < DP; ++x) sc += float(qs[r * DP + x]) * kr[x];
        float p = metal::exp(sc * scale - ls[r]);
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
if (valid) {
  for (int x = 0; x < D; ++x) dak[erow * D + x] = T(gk[x]);
  for (int x = 0; x < DV; ++x) dav[erow * DV + x] = T(gv[x]);
}
