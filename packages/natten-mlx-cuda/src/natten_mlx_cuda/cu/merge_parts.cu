// Merges the SPLIT parts of the forward's split walks (fmha_fwd with SPLIT > 1): part s of row r has a
// normalised output parts[s, r, :] and its lse parts_lse[s, r] (-inf when its keys miss the row's window,
// output 0). out[r] = sum_s w_s parts[s, r] / sum_s w_s and lse[r] = m + log(sum_s w_s), w_s = exp(lse_s - m),
// m the largest lse_s (finite: every row has keys in some part). One thread per row and 4 columns.
// Inputs parts [S, R, DV] float32, parts_lse [S, R] float32, rows [1] (R). Outputs out [R, DV] (OT),
// lse [R] float32. Template: OT, S, DV (a multiple of 4).
static_assert(DV % 4 == 0, "rows of whole float4");
constexpr int C = DV / 4;
const long long R = rows[0];
const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (i >= R * C) return;
const long long r = i / C;
const int c = (int)(i % C);
float m = NA_NEG_INF;
#pragma unroll
for (int s = 0; s < S; ++s) m = fmaxf(m, parts_lse[s * R + r]);
float acc[4] = {0.f, 0.f, 0.f, 0.f}, wsum = 0.f;
#pragma unroll
for (int s = 0; s < S; ++s) {
  const float w = expf(parts_lse[s * R + r] - m);
  const float4 p = reinterpret_cast<const float4*>(parts + (s * R + r) * DV)[c];
  acc[0] += w * p.x;
  acc[1] += w * p.y;
  acc[2] += w * p.z;
  acc[3] += w * p.w;
  wsum += w;
}
const float inv = 1.f / wsum;
#pragma unroll
for (int e = 0; e < 4; ++e) out[r * DV + 4 * c + e] = NaType<OT>::from_float(acc[e] * inv);
if (c == 0) lse[r] = m + logf(wsum);
