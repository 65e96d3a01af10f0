// Neighborhood attention forward, one thread per (batch, query, head): the reference kernel of the
// tier, any head dim up to DMAX, every dtype. Inputs query [B, N, H, D], key/value [B, NK, HKV, D|DV]
// (spatial axes flattened, local slabs), rpb [H, prod(2K-1)] (one dummy element without HAS_RPB), prm (ints, common.cuh),
// scl (scale). Outputs out [B, N, H, DV] (OT), lse [B, N, H] float32, natural log.
// Template: T, OT, DMAX, HAS_RPB.
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

float qv[DMAX];
const T* qp = query + ((long long)b * N + n) * ((long long)H * D) + (long long)h * D;
for (int i = 0; i < DMAX; ++i) qv[i] = i < D ? na_f(qp[i]) * scale : 0.f;
float acc[DMAX];
for (int i = 0; i < DMAX; ++i) acc[i] = 0.f;
float m = NA_NEG_INF, l = 0.f;

for (int k0 = ws[0]; k0 < we[0]; ++k0) {
  const int j0 = k0 * ax[0].d + g[0] - ax[0].kvoff;
  for (int k1 = ws[1]; k1 < we[1]; ++k1) {
    const int j1 = k1 * ax[1].d + g[1] - ax[1].kvoff;
    for (int k2 = ws[2]; k2 < we[2]; ++k2) {
      const int j2 = k2 * ax[2].d + g[2] - ax[2].kvoff;
      const long long key_row = ((long long)b * NK + ((long long)j0 * ax[1].nk + j1) * ax[2].nk + j2) * HKV + hk;
      const T* kp = key + key_row * D;
      float s = 0.f;
      for (int i = 0; i < D; ++i) s += qv[i] * na_f(kp[i]);
      if (HAS_RPB) {
        const int r = ((k0 - c[0] + ax[0].K - 1) * (2 * ax[1].K - 1) + (k1 - c[1] + ax[1].K - 1)) * (2 * ax[2].K - 1) +
                      (k2 - c[2] + ax[2].K - 1);
        s += na_f(rpb[(long long)h * prm[NA_P_RPB] + r]);
      }
      const float m_new = fmaxf(m, s);
      const float alpha = expf(m - m_new);
      const float p = expf(s - m_new);
      l = l * alpha + p;
      const T* vp = value + key_row * DV;
      for (int i = 0; i < DMAX; ++i)
        if (i < DV) acc[i] = acc[i] * alpha + p * na_f(vp[i]);
      m = m_new;
    }
  }
}
const long long row = ((long long)b * N + n) * H + h;
for (int i = 0; i < DV; ++i) out[row * DV + i] = NaType<OT>::from_float(acc[i < DMAX ? i : 0] / l);
lse[row] = m + logf(l);
