// Neighborhood attention backward, query side, one thread per (batch, query, head):
// dq = scale * sum_k ds_k k, ds_k = p_k (dO . v_k - delta), p_k = exp(s_k - lse); and, when HAS_RPB,
// d_rpb[h, slot] += ds_k (float32 atomics). Inputs as simple_fwd plus d_out [B, N, H, DV] (T),
// lse [B, N, H] and delta [B, N, H] (float32; delta = rowsum(d_out * out) - d_lse).
// Outputs dq [B, N, H, D] float32, d_rpb [H, prod(2K-1)] float32 (zero-initialised; one element without HAS_RPB).
// Template: T, DMAX, HAS_RPB.
const int B = prm[NA_P_B], H = prm[NA_P_H], HKV = prm[NA_P_HKV], N = prm[NA_P_N], NK = prm[NA_P_NK];
const int D = prm[NA_P_D], DV = prm[NA_P_DV];
const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (tid >= (long long)B * N * H) return;
const int h = (int)(tid % H);
const int n = (int)((tid / H) % N);
const int b = (int)(tid / ((long long)H * N));
const int hk = h / (H / HKV);
const float scale = scl[0];

NaAxis ax[3];
int g[3], c[3], ws[3], we[3];
int rem = n;
int icoord[3];
for (int a = 2; a >= 0; --a) {
  ax[a] = na_axis(prm, a);
  icoord[a] = rem % ax[a].n;
  rem /= ax[a].n;
}
for (int a = 0; a < 3; ++a) {
  const int gi = icoord[a] + ax[a].qoff;
  g[a] = gi % ax[a].d;
  c[a] = gi / ax[a].d;
  const int Lg = na_group_len(ax[a].L, ax[a].d, g[a]);
  ws[a] = na_window_start(c[a], Lg, ax[a].K, ax[a].s, ax[a].causal);
  we[a] = na_window_end(c[a], Lg, ax[a].K, ax[a].s, ax[a].causal);
}
const long long row = ((long long)b * N + n) * H + h;
float qv[DMAX], dov[DMAX], dq[DMAX];
for (int i = 0; i < DMAX; ++i) {
  qv[i] = i < D ? na_f(query[row * D + i]) * scale : 0.f;
  dov[i] = i < DV ? na_f(d_out[row * DV + i]) : 0.f;
  dq[i] = 0.f;
}
const float L = lse[row], dl = delta[row];

for (int k0 = ws[0]; k0 < we[0]; ++k0) {
  const int j0 = k0 * ax[0].d + g[0] - ax[0].kvoff;
  for (int k1 = ws[1]; k1 < we[1]; ++k1) {
    const int j1 = k1 * ax[1].d + g[1] - ax[1].kvoff;
    for (int k2 = ws[2]; k2 < we[2]; ++k2) {
      const int j2 = k2 * ax[2].d + g[2] - ax[2].kvoff;
      const long long key_row = ((long long)b * NK + ((long long)j0 * ax[1].nk + j1) * ax[2].nk + j2) * HKV + hk;
      const T* kp = key + key_row * D;
      const T* vp = value + key_row * DV;
      float s = 0.f, dp = 0.f;
      for (int i = 0; i < D; ++i) s += qv[i] * na_f(kp[i]);
      for (int i = 0; i < DV; ++i) dp += dov[i < DMAX ? i : 0] * na_f(vp[i]);
      int r = 0;
      if (HAS_RPB) {
        r = ((k0 - c[0] + ax[0].K - 1) * (2 * ax[1].K - 1) + (k1 - c[1] + ax[1].K - 1)) * (2 * ax[2].K - 1) +
            (k2 - c[2] + ax[2].K - 1);
        s += na_f(rpb[(long long)h * prm[NA_P_RPB] + r]);
      }
      const float ds = expf(s - L) * (dp - dl);
      for (int i = 0; i < DMAX; ++i)
        if (i < D) dq[i] += ds * na_f(kp[i]);
      if (HAS_RPB) atomicAdd(d_rpb + (long long)h * prm[NA_P_RPB] + r, ds);
    }
  }
}
for (int i = 0; i < D; ++i) d_query[row * D + i] = dq[i < DMAX ? i : 0] * scale;
