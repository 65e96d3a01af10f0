// The tier's drivers and kernels (driver.cpp, kernels.cpp: no MLX in them) built for another
// architecture and run under qemu-user by tests/aarch64/test_nanobind_aarch64.py: on x86-64 machines the aarch64
// (NEON) kernel table is otherwise only ever compiled on a Mac or an ARM Linux machine, never run here.
//
//   harness IN OUT
//
// IN: 21 int64 (L[3] K[3] S[3] Dl[3] C[3] B H Hkv D Dv E), has_rpb (int64), scale (float64), then float32
// arrays: q [B][N][H][D], k [B][N][Hkv][D], v [B][N][Hkv][Dv], ek [B][E][Hkv][D] and ev [B][E][Hkv][Dv]
// (E > 0), rpb [H][R] (has_rpb), dout [B][N][H][Dv], dlse [B][N][H], then attn and dscores, both
// [B][H][N][Kt + E] (the split ops' head-major layout).
// OUT, float32: the fused forward's out, lse; its backward's dq, dk, dv (dek, dev; drpb); the split
// ops on head-major copies of the same inputs: qk_forward's scores, qk_backward's dq, dk (dek; drpb) of
// dscores, av_forward's out of attn, av_backward's dattn, dv (dev) of dout (head-major, as the driver
// reads and writes them).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "driver.h"

namespace {

using Vec = std::vector<float>;

struct Reader {
  FILE* f;
  void raw(void* p, size_t n) {
    if (std::fread(p, 1, n, f) != n) {
      std::fprintf(stderr, "harness: input too short\n");
      std::exit(2);
    }
  }
  Vec floats(int64_t n) {
    Vec v(static_cast<size_t>(n));
    raw(v.data(), sizeof(float) * v.size());
    return v;
  }
};

// heads-last [B][N][H][W] -> head-major [B][H][N][W]
Vec head_major(const Vec& x, int64_t B, int64_t N, int64_t H, int64_t W) {
  Vec y(x.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) y[((b * H + h) * N + n) * W + w] = x[((b * N + n) * H + h) * W + w];
  return y;
}

void put(FILE* f, const Vec& v) { std::fwrite(v.data(), sizeof(float), v.size(), f); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: harness IN OUT\n");
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  Reader r{in};
  int64_t h[22];
  double scale;
  r.raw(h, sizeof(h));
  r.raw(&scale, sizeof(scale));
  na::Geo g{};
  g.N = g.Nk = 1;
  g.Rtot = g.Kt = 1;
  for (int a = 0; a < 3; ++a) {
    g.L[a] = g.Lk[a] = g.dom[a] = static_cast<int>(h[a]);
    g.K[a] = static_cast<int>(h[3 + a]);
    g.S[a] = static_cast<int>(h[6 + a]);
    g.Dl[a] = static_cast<int>(h[9 + a]);
    g.C[a] = h[12 + a] != 0;
    g.qoff[a] = g.koff[a] = 0;
    g.N *= g.L[a];
    g.R[a] = 2 * g.K[a] - 1;
    g.Rtot *= g.R[a];
    g.Kt *= g.K[a];
  }
  g.Nk = g.N;
  g.B = h[15], g.H = h[16], g.Hkv = h[17], g.D = h[18], g.Dv = h[19], g.E = h[20];
  g.G = g.H / g.Hkv;
  g.has_rpb = h[21] != 0;
  g.scale = static_cast<float>(scale);
  const int64_t B = g.B, N = g.N, H = g.H, Hkv = g.Hkv, D = g.D, Dv = g.Dv, E = g.E, W = g.Kt + g.E;

  Vec q = r.floats(B * N * H * D), k = r.floats(B * N * Hkv * D), v = r.floats(B * N * Hkv * Dv);
  Vec ek = r.floats(B * E * Hkv * D), ev = r.floats(B * E * Hkv * Dv);
  Vec rpb = r.floats(g.has_rpb ? H * g.Rtot : 0);
  Vec dout = r.floats(B * N * H * Dv), dlse = r.floats(B * N * H);
  Vec attn = r.floats(B * H * N * W), dscores = r.floats(B * H * N * W);
  std::fclose(in);
  const float* pek = E ? ek.data() : nullptr;
  const float* pev = E ? ev.data() : nullptr;
  const float* prpb = g.has_rpb ? rpb.data() : nullptr;

  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  // fused forward and backward (heads-last; extras [B][E][Hkv][.])
  Vec o(B * N * H * Dv), lse(B * N * H);
  na::FwdArgs fa{q.data(), k.data(), v.data(), pek, pev, prpb, o.data(), lse.data()};
  na::fused_forward(g, fa);
  Vec dq(q.size()), dk(k.size()), dv(v.size()), dek(ek.size()), dev(ev.size()), drpb(rpb.size());
  na::BwdArgs ba{q.data(),    k.data(),    v.data(),   pek,       pev,       prpb,
                 o.data(),    lse.data(),  dout.data(), dlse.data(), dq.data(), dk.data(),
                 dv.data(),   E ? dek.data() : nullptr, E ? dev.data() : nullptr,
                 g.has_rpb ? drpb.data() : nullptr};
  na::fused_backward(g, ba);
  for (const Vec* x : {&o, &lse, &dq, &dk, &dv, &dek, &dev, &drpb}) put(out, *x);

  // split ops (head-major; extras [B][Hkv][E][.])
  const Vec qh = head_major(q, B, N, H, D), kh = head_major(k, B, N, Hkv, D), vh = head_major(v, B, N, Hkv, Dv);
  const Vec ekh = head_major(ek, B, E, Hkv, D), evh = head_major(ev, B, E, Hkv, Dv);
  const Vec douth = head_major(dout, B, N, H, Dv);
  Vec scores(B * H * N * W);
  na::qk_forward(g, qh.data(), kh.data(), E ? ekh.data() : nullptr, prpb, scores.data());
  Vec sdq(qh.size()), sdk(kh.size()), sdek(ekh.size()), sdrpb(rpb.size());
  na::qk_backward(g, qh.data(), kh.data(), E ? ekh.data() : nullptr, dscores.data(), sdq.data(), sdk.data(),
                  E ? sdek.data() : nullptr, g.has_rpb ? sdrpb.data() : nullptr);
  Vec av(B * H * N * Dv);
  na::av_forward(g, attn.data(), vh.data(), E ? evh.data() : nullptr, av.data());
  Vec da(attn.size()), sdv(vh.size()), sdev(evh.size());
  na::av_backward(g, attn.data(), vh.data(), E ? evh.data() : nullptr, douth.data(), da.data(), sdv.data(),
                  E ? sdev.data() : nullptr);
  for (const Vec* x : {&scores, &sdq, &sdk, &sdek, &sdrpb, &av, &da, &sdv, &sdev}) put(out, *x);
  std::fclose(out);
  // the kernel table, the threads, then the path counters (driver.h: path_counts)
  std::printf("%s %d", na::simd_name(), na::num_threads());
  for (int64_t c : na::path_counts(false)) std::printf(" %lld", static_cast<long long>(c));
  std::printf("\n");
  return 0;
}
