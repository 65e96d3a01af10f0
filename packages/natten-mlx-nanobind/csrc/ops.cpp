// MLX primitives of neighborhood attention. Arguments are validated when an op is built (on the
// caller's thread, where an exception becomes a Python ValueError); eval_cpu only converts
// layouts and dtypes and runs driver.cpp on the stream's thread.
#include "ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "driver.h"
#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/device.h"
#include "mlx/ops.h"
#include "mlx/types/half_types.h"
#include "natten_mlx/window.h"

namespace na {

bool Config::operator==(const Config& o) const {
  if (nd != o.nd || scale != o.scale || extra != o.extra || rpb != o.rpb || sub != o.sub) return false;
  for (int a = 0; a < 3; ++a)
    if (K[a] != o.K[a] || S[a] != o.S[a] || Dl[a] != o.Dl[a] || C[a] != o.C[a] || dom[a] != o.dom[a] ||
        qoff[a] != o.qoff[a] || koff[a] != o.koff[a])
      return false;
  return true;
}

namespace {

// ---------------------------------------------------------------- input positions
struct Slots {
  int q = -1, k = -1, v = -1, ek = -1, ev = -1, rpb = -1;  // fused and split-op primals
  int attn = -1;
  int out = -1, lse = -1, dout = -1, dlse = -1, dscores = -1;  // backward extras
  int n_primals = 0;
};

Slots slots_of(OpKind kind, const Config& c) {
  Slots s;
  int i = 0;
  switch (kind) {
    case OpKind::FusedFwd:
    case OpKind::FusedBwd:
      s.q = i++, s.k = i++, s.v = i++;
      if (c.extra) s.ek = i++, s.ev = i++;
      if (c.rpb) s.rpb = i++;
      s.n_primals = i;
      if (kind == OpKind::FusedBwd) s.out = i++, s.lse = i++, s.dout = i++, s.dlse = i++;
      break;
    case OpKind::QkFwd:
    case OpKind::QkBwd:
      s.q = i++, s.k = i++;
      if (c.extra) s.ek = i++;
      if (c.rpb) s.rpb = i++;
      s.n_primals = i;
      if (kind == OpKind::QkBwd) s.dscores = i++;
      break;
    case OpKind::AvFwd:
    case OpKind::AvBwd:
      s.attn = i++, s.v = i++;
      if (c.extra) s.ev = i++;
      s.n_primals = i;
      if (kind == OpKind::AvBwd) s.dout = i++;
      break;
  }
  return s;
}

// ---------------------------------------------------------------- geometry
Geo geo_of(OpKind kind, const Config& c, const std::vector<mx::array>& in) {
  Slots s = slots_of(kind, c);
  Geo g{};
  const int off = 3 - c.nd;
  for (int a = 0; a < 3; ++a) {
    g.L[a] = 1, g.K[a] = 1, g.S[a] = 1, g.Dl[a] = 1, g.C[a] = false;
    g.Lk[a] = 1, g.dom[a] = 1, g.qoff[a] = 0, g.koff[a] = 0;
  }
  const mx::array& lead = s.q >= 0 ? in[s.q] : in[s.attn];
  const mx::array& kv = s.k >= 0 ? in[s.k] : in[s.v];
  for (int a = 0; a < c.nd; ++a) {
    g.L[off + a] = lead.shape(1 + a);
    g.Lk[off + a] = kv.shape(1 + a);
    g.dom[off + a] = c.sub ? c.dom[a] : lead.shape(1 + a);
    g.qoff[off + a] = c.sub ? c.qoff[a] : 0;
    g.koff[off + a] = c.sub ? c.koff[a] : 0;
    g.K[off + a] = c.K[a];
    g.S[off + a] = c.S[a];
    g.Dl[off + a] = c.Dl[a];
    g.C[off + a] = c.C[a];
  }
  g.N = static_cast<int64_t>(g.L[0]) * g.L[1] * g.L[2];
  g.Nk = static_cast<int64_t>(g.Lk[0]) * g.Lk[1] * g.Lk[2];
  g.B = lead.shape(0);
  g.H = lead.shape(-2);
  g.Hkv = kv.shape(-2);
  g.G = g.H / g.Hkv;
  g.D = s.q >= 0 ? in[s.q].shape(-1) : 0;
  g.Dv = s.v >= 0 ? in[s.v].shape(-1) : 0;
  g.E = c.extra ? (s.ek >= 0 ? in[s.ek].shape(1) : in[s.ev].shape(1)) : 0;
  g.Rtot = 1;
  g.Kt = 1;
  for (int a = 0; a < 3; ++a) {
    g.R[a] = 2 * g.K[a] - 1;
    g.Rtot *= g.R[a];
    g.Kt *= g.K[a];
  }
  g.scale = c.scale;
  g.has_rpb = c.rpb;
  return g;
}

// ---------------------------------------------------------------- layout conversion
// A source array seen as [B][X0][X1][X2][H][W] (element strides; absent axes have size 1).
struct View {
  const char* ptr;
  mx::Dtype dt;
  int64_t size[6];
  int64_t stride[6];
};

// x is [B, *spatial(nsp), H, W], or [B, *spatial, H] when has_w is false
View view_bshw(const mx::array& x, int nsp, bool has_w) {
  View v{x.data<char>(), x.dtype(), {}, {}};
  for (int i = 0; i < 6; ++i) v.size[i] = 1, v.stride[i] = 0;
  v.size[0] = x.shape(0), v.stride[0] = x.strides()[0];
  for (int a = 0; a < nsp; ++a) {
    v.size[1 + 3 - nsp + a] = x.shape(1 + a);
    v.stride[1 + 3 - nsp + a] = x.strides()[1 + a];
  }
  v.size[4] = x.shape(1 + nsp), v.stride[4] = x.strides()[1 + nsp];
  if (has_w) v.size[5] = x.shape(2 + nsp), v.stride[5] = x.strides()[2 + nsp];
  return v;
}

// rpb [H, R0(, R1(, R2))] seen as [1][R0][R1][R2][H][1]: its canonical form is [H][R]
View view_rpb(const mx::array& x, int nd) {
  View v{x.data<char>(), x.dtype(), {}, {}};
  for (int i = 0; i < 6; ++i) v.size[i] = 1, v.stride[i] = 0;
  for (int a = 0; a < nd; ++a) {
    v.size[1 + 3 - nd + a] = x.shape(1 + a);
    v.stride[1 + 3 - nd + a] = x.strides()[1 + a];
  }
  v.size[4] = x.shape(0), v.stride[4] = x.strides()[0];
  return v;
}

// n values at src, element stride st (1, 0: one value broadcast, or any), as float32 at dst: float32
// rows copied, float16 / bfloat16 rows through the kernel table's vector conversions where it has them
// (bitwise as MLX's own), else one value at a time through MLX's types
template <class T>
void to_f32(const KernelTable& kt, const T* src, int64_t st, float* dst, int64_t n) {
  if (st == 0) {
    std::fill(dst, dst + n, static_cast<float>(src[0]));
    return;
  }
  if (st == 1) {
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(dst, src, sizeof(float) * n);
      return;
    } else {
      auto cvt = std::is_same_v<T, mx::float16_t> ? kt.h2f : kt.b2f;
      if (cvt) {
        cvt(reinterpret_cast<const uint16_t*>(src), dst, n);
        return;
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * st]);
}

// n float32 values to T (the same conversions back)
template <class T>
void from_f32(const KernelTable& kt, const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    auto cvt = std::is_same_v<T, mx::float16_t> ? kt.f2h : kt.f2b;
    if (cvt) {
      cvt(src, reinterpret_cast<uint16_t*>(dst), n);
      return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// tokens per task of the layout conversions (a token's heads are contiguous on the heads-last side)
constexpr int64_t kTokChunk = 64;

template <class T>
void gather_t(const View& v, float* dst, bool heads_last = false) {
  const KernelTable& kt = select_kernels();
  const int64_t B = v.size[0], X0 = v.size[1], X1 = v.size[2], X2 = v.size[3], H = v.size[4], W = v.size[5];
  const int64_t N = X0 * X1 * X2;
  const T* base = reinterpret_cast<const T*>(v.ptr);
  auto token = [&](int64_t b, int64_t t) {
    const int64_t x0 = t / (X1 * X2), x1 = t / X2 % X1, x2 = t % X2;
    return base + b * v.stride[0] + x0 * v.stride[1] + x1 * v.stride[2] + x2 * v.stride[3];
  };
  if (heads_last) {
    // [B][N][H][W]: a task takes kTokChunk tokens and writes their rows in order (a view's token is
    // one row of H * W where its heads are contiguous too: a slice of a fused qkv projection)
    const bool whole = v.stride[5] == 1 && (H == 1 || v.stride[4] == W);
    parallel_for((B * N + kTokChunk - 1) / kTokChunk, [&](int64_t c) {
      for (int64_t bt = c * kTokChunk, e = std::min(B * N, bt + kTokChunk); bt < e; ++bt) {
        const T* src = token(bt / N, bt % N);
        float* out = dst + bt * H * W;
        if (whole) {
          to_f32(kt, src, 1, out, H * W);
          continue;
        }
        for (int64_t h = 0; h < H; ++h) to_f32(kt, src + h * v.stride[4], v.stride[5], out + h * W, W);
      }
    });
    return;
  }
  // canonical [B][H][N][W]: consecutive tokens are W apart
  parallel_for(B * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    float* out = dst + bh * N * W;
    for (int64_t t = 0; t < N; ++t, out += W) to_f32(kt, token(b, t) + h * v.stride[4], v.stride[5], out, W);
  });
}

// A float32 buffer of n floats from the call's scratch.
struct Buf {
  float* p = nullptr;
  size_t n = 0;
  float* data() const { return p; }
  size_t size() const { return n; }
  bool empty() const { return n == 0; }
};

Buf buf(size_t n) { return Buf{n ? scratch(n) : nullptr, n}; }

// canonical float32 [B][H][N][W] copy of a view (every float dtype MLX has is accepted here), or the
// heads-last [B][N][H][W] order of MLX's own contiguous arrays
Buf gather(const View& v, bool heads_last = false) {
  Buf dst = buf(static_cast<size_t>(v.size[0] * v.size[1] * v.size[2] * v.size[3] * v.size[4] * v.size[5]));
  switch (v.dt) {
    case mx::float32: gather_t<float>(v, dst.data(), heads_last); break;
    case mx::float16: gather_t<mx::float16_t>(v, dst.data(), heads_last); break;
    case mx::bfloat16: gather_t<mx::bfloat16_t>(v, dst.data(), heads_last); break;
    default: throw std::invalid_argument("natten_mlx_nanobind: internal error: non-float input reached a kernel");
  }
  return dst;
}

template <class T>
void scatter_t(const float* src, int64_t B, int64_t N, int64_t H, int64_t W, bool heads_last, T* dst) {
  // canonical [B][H][N][W] -> contiguous [B][N][H][W] (heads_last) or [B][H][N][W]
  const KernelTable& kt = select_kernels();
  parallel_for((B * N + kTokChunk - 1) / kTokChunk, [&](int64_t c) {
    for (int64_t bn = c * kTokChunk, e = std::min(B * N, bn + kTokChunk); bn < e; ++bn) {
      const int64_t b = bn / N, n = bn % N;
      for (int64_t h = 0; h < H; ++h) {
        const float* s = src + ((b * H + h) * N + n) * W;
        from_f32(kt, s, dst + (heads_last ? (bn * H + h) * W : ((b * H + h) * N + n) * W), W);
      }
    }
  });
}

// a float32 buffer into a float16 / bfloat16 array of as many values (kernel outputs computed in scratch)
void convert_out(const float* src, mx::array& dst) {
  const KernelTable& kt = select_kernels();
  const int64_t n = static_cast<int64_t>(dst.size());
  constexpr int64_t kChunk = 1 << 16;
  parallel_for((n + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t i = c * kChunk, m = std::min(n - i, kChunk);
    if (dst.dtype() == mx::float16)
      from_f32(kt, src + i, dst.data<mx::float16_t>() + i, m);
    else
      from_f32(kt, src + i, dst.data<mx::bfloat16_t>() + i, m);
  });
}

void scatter(const Buf& src, int64_t B, int64_t N, int64_t H, int64_t W, bool heads_last,
             mx::array& out) {
  switch (out.dtype()) {
    case mx::float32: scatter_t(src.data(), B, N, H, W, heads_last, out.data<float>()); break;
    case mx::float16: scatter_t(src.data(), B, N, H, W, heads_last, out.data<mx::float16_t>()); break;
    case mx::bfloat16: scatter_t(src.data(), B, N, H, W, heads_last, out.data<mx::bfloat16_t>()); break;
    default: throw std::invalid_argument("natten_mlx_nanobind: internal error: non-float output");
  }
}

// The token stride (floats) of x [B, *spatial(nsp), H, W] when it is float32 with each token's H x W values
// contiguous and its tokens (batch and spatial axes flattened) evenly spaced without overlap: MLX's contiguous
// arrays (stride H * W) and slices of a fused qkv projection ([B, *spatial, 3, H, W] indexed on its 3 axis: 3 H W),
// which the fused ops read in place; else 0 (copied into a contiguous buffer first)
int64_t token_stride(const mx::array& x, int nsp) {
  if (x.dtype() != mx::float32) return 0;
  const int64_t H = x.shape(1 + nsp), W = x.shape(2 + nsp);
  if (x.flags().row_contiguous) return H * W;
  const auto& st = x.strides();
  if ((W > 1 && st[2 + nsp] != 1) || (H > 1 && st[1 + nsp] != W)) return 0;
  int64_t T = 0, span = 1;  // the stride of the last token axis longer than 1, the tokens after each axis
  for (int a = nsp; a >= 0; --a) {
    const int64_t n = x.shape(a);
    if (n == 1) continue;
    if (T == 0) {
      T = st[a];
      if (T < H * W) return 0;
    } else if (st[a] != T * span) {
      return 0;
    }
    span *= n;
  }
  return T ? T : H * W;
}

void run(OpKind kind, const Config& c, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const Slots s = slots_of(kind, c);
  Geo g = geo_of(kind, c, in);
  const int nd = c.nd;
  auto canon = [&](int i, bool has_w = true) { return gather(view_bshw(in[i], nd, has_w)); };
  auto canon_extra = [&](int i) { return gather(view_bshw(in[i], 1, true)); };
  scratch_reset();
  // float32 row-contiguous inputs are read in place; others are converted in the same layout
  auto hl = [&](int i, int nsp, bool has_w = true) -> const float* {
    if (i < 0) return nullptr;
    const mx::array& x = in[i];
    if (x.dtype() == mx::float32 && x.flags().row_contiguous) return x.data<float>();
    return gather(view_bshw(x, nsp, has_w), true).data();
  };
  // q, k, v: read in place where their tokens are evenly spaced (token_stride), their stride into g
  auto hl_qkv = [&](int i, int64_t& ts) -> const float* {
    const mx::array& x = in[i];
    ts = token_stride(x, nd);
    if (ts) return x.data<float>();
    return hl(i, nd);  // (contiguous after the copy: ts 0)
  };
  if (kind == OpKind::FusedBwd) {
    Buf rp = s.rpb >= 0 ? gather(view_rpb(in[s.rpb], nd)) : Buf{};
    // the kernels write heads-last float32: straight into float32 outputs, else into scratch converted after
    std::vector<std::pair<float*, mx::array*>> convert;
    auto grad_out = [&](int i, size_t n) -> float* {
      if (n == 0) return nullptr;
      if (out[i].dtype() == mx::float32) return out[i].data<float>();
      float* p = buf(n).data();
      convert.emplace_back(p, &out[i]);
      return p;
    };
    const size_t nq = g.B * g.N * g.H * g.D, nk = g.B * g.Nk * g.Hkv * g.D, nv = g.B * g.Nk * g.Hkv * g.Dv;
    const size_t nek = g.B * g.E * g.Hkv * g.D, nev = g.B * g.E * g.Hkv * g.Dv;
    float* dq = grad_out(0, nq);
    float* dk = grad_out(1, nk);
    float* dv = grad_out(2, nv);
    float* dek = c.extra ? grad_out(3, nek) : nullptr;
    float* dev = c.extra ? grad_out(4, nev) : nullptr;
    auto drpb = buf(rp.size());
    const float* pq = hl_qkv(s.q, g.tq);
    const float* pk = hl_qkv(s.k, g.tk);
    const float* pv = hl_qkv(s.v, g.tv);
    fused_backward(g, BwdArgs{pq, pk, pv, hl(s.ek, 1), hl(s.ev, 1),
                              rp.empty() ? nullptr : rp.data(), hl(s.out, nd), hl(s.lse, nd, false),
                              hl(s.dout, nd), hl(s.dlse, nd, false), dq, dk, dv, dek, dev, drpb.data(),
                              convert.empty()});
    for (auto& [src, dst] : convert) convert_out(src, *dst);
    if (c.rpb) scatter(drpb, 1, g.Rtot, g.H, 1, false, out[c.extra ? 5 : 3]);
    return;
  }
  if (kind == OpKind::FusedFwd) {
    const float* pq = hl_qkv(s.q, g.tq);
    const float* pk = hl_qkv(s.k, g.tk);
    const float* pv = hl_qkv(s.v, g.tv);
    const float* pek2 = hl(s.ek, 1);
    const float* pev2 = hl(s.ev, 1);
    Buf rp = s.rpb >= 0 ? gather(view_rpb(in[s.rpb], nd)) : Buf{};
    float* po = out[0].dtype() == mx::float32 ? out[0].data<float>() : buf(g.B * g.N * g.H * g.Dv).data();
    fused_forward(g, FwdArgs{pq, pk, pv, pek2, pev2, rp.empty() ? nullptr : rp.data(), po, out[1].data<float>(),
                             out[0].dtype() == mx::float32});
    if (out[0].dtype() != mx::float32) convert_out(po, out[0]);
    return;
  }
  Buf q, k, v, ek, ev, rpb;
  if (s.q >= 0) q = canon(s.q);
  if (s.k >= 0) k = canon(s.k);
  if (s.v >= 0) v = canon(s.v);
  if (s.ek >= 0) ek = canon_extra(s.ek);
  if (s.ev >= 0) ev = canon_extra(s.ev);
  if (s.rpb >= 0) rpb = gather(view_rpb(in[s.rpb], nd));
  const float* pek = ek.empty() ? nullptr : ek.data();
  const float* pev = ev.empty() ? nullptr : ev.data();
  const float* prpb = rpb.empty() ? nullptr : rpb.data();
  switch (kind) {
    case OpKind::FusedFwd:
      break;  // handled above
    case OpKind::FusedBwd:
      break;  // handled above
    case OpKind::QkFwd: {
      auto sc = buf(g.B * g.H * g.N * (g.Kt + g.E));
      qk_forward(g, q.data(), k.data(), pek, prpb, sc.data());
      scatter(sc, g.B, g.N, g.H, g.Kt + g.E, true, out[0]);
      break;
    }
    case OpKind::QkBwd: {
      auto ds = canon(s.dscores);
      auto dq = buf(q.size()), dk = buf(k.size()), dek = buf(ek.size()), drpb = buf(rpb.size());
      qk_backward(g, q.data(), k.data(), pek, ds.data(), dq.data(), dk.data(), dek.data(),
                  c.rpb ? drpb.data() : nullptr);
      int i = 0;
      scatter(dq, g.B, g.N, g.H, g.D, true, out[i++]);
      scatter(dk, g.B, g.Nk, g.Hkv, g.D, true, out[i++]);
      if (c.extra) scatter(dek, g.B, g.E, g.Hkv, g.D, true, out[i++]);
      if (c.rpb) scatter(drpb, 1, g.Rtot, g.H, 1, false, out[i++]);
      break;
    }
    case OpKind::AvFwd: {
      auto attn = canon(s.attn);
      auto o = buf(g.B * g.H * g.N * g.Dv);
      av_forward(g, attn.data(), v.data(), pev, o.data());
      scatter(o, g.B, g.N, g.H, g.Dv, true, out[0]);
      break;
    }
    case OpKind::AvBwd: {
      auto attn = canon(s.attn), dout = canon(s.dout);
      auto da = buf(attn.size()), dv = buf(v.size()), dev = buf(ev.size());
      av_backward(g, attn.data(), v.data(), pev, dout.data(), da.data(), dv.data(), dev.data());
      int i = 0;
      scatter(da, g.B, g.N, g.H, g.Kt + g.E, true, out[i++]);
      scatter(dv, g.B, g.Nk, g.Hkv, g.Dv, true, out[i++]);
      if (c.extra) scatter(dev, g.B, g.E, g.Hkv, g.Dv, true, out[i++]);
      break;
    }
  }
}

template <class T>
void fill_nan_t(mx::array& a) {
  T* p = a.data<T>();
  for (size_t i = 0; i < a.size(); ++i) p[i] = static_cast<T>(NAN);
}

// ---------------------------------------------------------------- validation
const char* kind_name(OpKind k) {
  switch (k) {
    case OpKind::FusedFwd: return "NeighborhoodAttention";
    case OpKind::FusedBwd: return "NeighborhoodAttentionVJP";
    case OpKind::QkFwd: return "NeighborhoodQK";
    case OpKind::QkBwd: return "NeighborhoodQKVJP";
    case OpKind::AvFwd: return "NeighborhoodAV";
    case OpKind::AvBwd: return "NeighborhoodAVVJP";
  }
  return "Neighborhood";
}

std::string shape_str(const mx::array& a) {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("natten_mlx_nanobind: " + msg); }

void check_float(const char* name, const mx::array& a) {
  if (a.dtype() != mx::float32 && a.dtype() != mx::float16 && a.dtype() != mx::bfloat16) {
    std::ostringstream os;
    os << name << " has dtype " << a.dtype() << "; supported dtypes are float32, float16 and bfloat16";
    throw std::invalid_argument("natten_mlx_nanobind: " + os.str());
  }
  if (a.size() == 0) fail(std::string(name) + " has shape " + shape_str(a) + " with no elements; empty arrays are not served");
}

void check_rank(const char* name, const mx::array& a, int rank, const char* layout) {
  if (static_cast<int>(a.ndim()) != rank)
    fail(std::string(name) + " has shape " + shape_str(a) + " (rank " + std::to_string(a.ndim()) + "); expected rank " +
         std::to_string(rank) + " " + layout);
}

Config make_config(int nd, const std::vector<int>& K, const std::vector<int>& S, const std::vector<int>& Dl,
                   const std::vector<bool>& C, const mx::array& lead) {
  if (nd < 1 || nd > 3) fail("expected 1, 2 or 3 spatial axes, got " + std::to_string(nd));
  auto check_len = [&](const char* name, size_t n) {
    if (static_cast<int>(n) != nd)
      fail(std::string(name) + " has " + std::to_string(n) + " entries; a " + std::to_string(nd) +
           "D op needs one per spatial axis");
  };
  check_len("kernel_size", K.size());
  check_len("stride", S.size());
  check_len("dilation", Dl.size());
  check_len("is_causal", C.size());
  Config c{};
  c.nd = nd;
  for (int a = 0; a < 3; ++a) c.K[a] = c.S[a] = c.Dl[a] = 1, c.C[a] = false;
  for (int a = 0; a < nd; ++a) {
    const int L = lead.shape(1 + a);
    if (K[a] < 2) fail("kernel_size[" + std::to_string(a) + "]=" + std::to_string(K[a]) + " must be >= 2");
    if (S[a] < 1) fail("stride[" + std::to_string(a) + "]=" + std::to_string(S[a]) + " must be >= 1");
    if (Dl[a] < 1) fail("dilation[" + std::to_string(a) + "]=" + std::to_string(Dl[a]) + " must be >= 1");
    if (static_cast<int64_t>(K[a]) * Dl[a] > L)
      fail("kernel_size=" + std::to_string(K[a]) + " with dilation=" + std::to_string(Dl[a]) + " spans " +
           std::to_string(static_cast<int64_t>(K[a]) * Dl[a]) + " tokens along spatial axis " + std::to_string(a) +
           ", but the input has only " + std::to_string(L) + "; kernel_size * dilation must be <= input size");
    if (S[a] > K[a])
      fail("stride=" + std::to_string(S[a]) + " along spatial axis " + std::to_string(a) + " exceeds kernel_size=" +
           std::to_string(K[a]));
    c.K[a] = K[a], c.S[a] = S[a], c.Dl[a] = Dl[a], c.C[a] = C[a];
  }
  return c;
}

void check_same(const char* what, const mx::array& a, const char* an, const mx::array& b, const char* bn, int dims) {
  for (int i = 0; i < dims; ++i)
    if (a.shape(i) != b.shape(i))
      fail(std::string(an) + " " + shape_str(a) + " and " + bn + " " + shape_str(b) + " must share " + what);
}

void check_extra(const char* name, const mx::array& x, const mx::array& lead, int64_t kv_heads, int64_t width,
                 int64_t* num) {
  check_float(name, x);
  check_rank(name, x, 4, "[B, N_extra, H_kv, D]");
  if (x.shape(0) != lead.shape(0) || x.shape(2) != kv_heads || x.shape(3) != width)
    fail(std::string(name) + " has shape " + shape_str(x) + "; expected [B=" + std::to_string(lead.shape(0)) +
         ", N_extra, H_kv=" + std::to_string(kv_heads) + ", " + std::to_string(width) + "]");
  if (*num && x.shape(1) != *num) fail("additional_keys and additional_values disagree on N_extra");
  *num = x.shape(1);
}

void check_rpb(const mx::array& r, int64_t heads, const Config& c) {
  check_float("rpb", r);
  bool ok = static_cast<int>(r.ndim()) == c.nd + 1 && r.shape(0) == heads;
  for (int a = 0; ok && a < c.nd; ++a) ok = r.shape(1 + a) == 2 * c.K[a] - 1;
  if (!ok) fail("rpb has shape " + shape_str(r) + "; expected [H, 2*K-1 per axis]");
  for (int a = 0; a < c.nd; ++a)
    if (c.C[a]) fail("rpb cannot be combined with causal masking");
}

void check_dtypes(const std::vector<mx::array>& xs) {
  for (auto& x : xs)
    if (x.dtype() != xs[0].dtype()) fail("inputs have different dtypes; they must be equal");
}

mx::Stream cpu_stream(mx::StreamOrDevice s) {
  mx::Stream st = mx::to_stream(s);
  if (st.device.type != mx::Device::DeviceType::cpu)
    fail("this backend runs on CPU streams only; pass stream=mx.cpu (the GPU tiers serve GPU streams)");
  return st;
}

float scale_of(std::optional<double> scale, int64_t D) {
  double s = scale ? *scale : std::pow(static_cast<double>(D), -0.5);
  if (!std::isfinite(s)) fail("scale=" + std::to_string(s) + " must be a finite number");
  return static_cast<float>(s);
}

// ---------------------------------------------------------------- output buffers
// MLX's CPU-only builds take every buffer from malloc and give it back on free, and glibc returns large
// freed blocks to the system: every block above its mmap threshold (which rises with the blocks freed,
// to 32 MiB at most), and the heap's free top once it passes the trim threshold. A call's outputs were
// then fresh pages, faulted in and cleared by the kernels' first stores: C2 at batch 16 (32 MiB
// outputs) faulted 8193 pages per forward and ~35000 per forward+backward, which took ~1.6x the time
// of the same call on warm pages (RESULTS, twenty-sixth pass). So output buffers of kPoolMin bytes or
// more are kept when their arrays die and handed to the next output of the same size, up to
// NATTEN_MLX_POOL_MB megabytes (read per call; default 1024, 0 = off), the oldest released first.
// Builds with a GPU backend (Metal, CUDA) cache buffers in their own allocators and skip this.
constexpr size_t kPoolMin = size_t{1} << 16;

size_t pool_cap() {
  static const bool gpu = mx::is_available(mx::Device::gpu);
  if (gpu) return 0;
  const char* env = std::getenv("NATTEN_MLX_POOL_MB");
  if (!env || !*env) return size_t{1024} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  return (*end || mb <= 0) ? 0 : static_cast<size_t>(mb) << 20;
}

class OutPool {
 public:
  static OutPool& get() {
    static OutPool* pool = new OutPool;  // never destroyed: arrays may die during interpreter exit
    return *pool;
  }

  // a buffer of n bytes whose array gives it back here when it dies
  mx::allocator::Data take(size_t n) {
    const size_t cap = pool_cap();
    trim(cap);  // a lowered cap frees what it no longer allows
    if (cap == 0 || n < kPoolMin || n > cap) return mx::allocator::malloc(n);
    mx::allocator::Buffer b{nullptr};
    {
      std::lock_guard<std::mutex> lk(m_);
      int best = -1;
      for (int i = 0; i < static_cast<int>(free_.size()); ++i)
        if (free_[i].n == n && (best < 0 || free_[i].stamp > free_[best].stamp)) best = i;
      if (best >= 0) {
        b = free_[best].b;
        bytes_ -= n;
        free_.erase(free_.begin() + best);
      }
    }
    if (!b.ptr()) {
      b = mx::allocator::allocator().malloc(n);
      if (!b.ptr()) throw std::runtime_error("natten_mlx_nanobind: unable to allocate " + std::to_string(n) + " bytes");
    }
    return mx::allocator::Data(b, [n](mx::allocator::Buffer buf) { OutPool::get().give(buf, n); });
  }

  // every kept buffer's bytes set to 0xFF (NaN in every float dtype): tests of outputs fully written
  void poison() {
    std::lock_guard<std::mutex> lk(m_);
    for (auto& e : free_) std::memset(e.b.raw_ptr(), 0xFF, e.n);
  }

  size_t bytes() {
    std::lock_guard<std::mutex> lk(m_);
    return bytes_;
  }

  // frees every kept buffer (and those over a lowered cap)
  void trim(size_t cap) {
    std::vector<mx::allocator::Buffer> drop;
    {
      std::lock_guard<std::mutex> lk(m_);
      while (bytes_ > cap) {
        auto oldest = std::min_element(free_.begin(), free_.end(),
                                       [](const Entry& a, const Entry& b) { return a.stamp < b.stamp; });
        bytes_ -= oldest->n;
        drop.push_back(oldest->b);
        free_.erase(oldest);
      }
    }
    for (auto& b : drop) mx::allocator::allocator().free(b);
  }

 private:
  struct Entry {
    size_t n;
    mx::allocator::Buffer b;
    uint64_t stamp;
  };

  void give(mx::allocator::Buffer b, size_t n) {
    const size_t cap = pool_cap();
    if (n > cap) {
      mx::allocator::allocator().free(b);
      trim(cap);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      free_.push_back(Entry{n, b, ++clock_});
      bytes_ += n;
    }
    trim(cap);
  }

  std::mutex m_;
  std::vector<Entry> free_;
  size_t bytes_ = 0;
  uint64_t clock_ = 0;
};

// ---------------------------------------------------------------- the caller's vector state
// The kernels leave the upper halves of the ymm registers in use on the thread that ran them, which for the
// caller's share of every call is MLX's CPU stream thread. MLX's Linux build runs its own CPU code there, much
// of it SSE (non-VEX) instructions, which then pay a false dependency on those upper halves: after one call of
// this tier, MLX's matmul (nn.Linear(128, 384) on 4096 tokens) took 235 ms instead of 72, for as long as the
// process ran. So every task ends with vzeroupper, as compilers end AVX functions. XINUSE's AVX bit (xgetbv with
// ecx = 1) before and after it is kept for tests.
#if defined(__x86_64__)
int avx_upper_in_use() {
  static const bool can = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__builtin_cpu_supports("avx") || __get_cpuid_max(0, nullptr) < 0xD) return false;
    __cpuid_count(0xD, 1, a, b, c, d);
    return (a & 4u) != 0;  // XGETBV with ecx = 1
  }();
  if (!can) return -1;
  unsigned lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(1u));
  return static_cast<int>((lo >> 2) & 1u);
}

void clear_upper_state() {
  static const bool avx = __builtin_cpu_supports("avx");
  // (this file is compiled without AVX: the compiler keeps nothing in the upper halves vzeroupper clears)
  if (avx) asm volatile("vzeroupper" ::: "memory");
}
#else
int avx_upper_in_use() { return -1; }
void clear_upper_state() {}
#endif

std::atomic<int> upper_before{-1}, upper_after{-1};

}  // namespace

std::pair<int, int> upper_state() { return {upper_before.load(), upper_after.load()}; }

size_t pool_bytes() { return OutPool::get().bytes(); }
void pool_clear() { OutPool::get().trim(0); }
void pool_poison() { OutPool::get().poison(); }

// ---------------------------------------------------------------- primitive
void NAOp::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& o : outputs) {
    // on a 64-byte line: MLX's CPU buffers start 8 bytes past malloc's pointer (24 mod 64 for a large
    // one), so a head's row of 32 floats would span three lines, shared with the neighbouring heads,
    // whose stores may come from another thread at the same time; 64 bytes more fixes that
    mx::allocator::Data d = OutPool::get().take(o.nbytes() + 64);
    const auto p = reinterpret_cast<std::uintptr_t>(d.buffer().raw_ptr());
    const int64_t off = static_cast<int64_t>((64 - p % 64) % 64);
    const auto mx_dim = std::max_element(o.shape().begin(), o.shape().end());
    const bool col = o.size() <= 1 || static_cast<int64_t>(o.size()) == *mx_dim;
    mx::array::Flags fl;
    fl.contiguous = true;
    fl.row_contiguous = true;
    fl.col_contiguous = col;
    o.set_data(std::move(d), o.size(), o.strides(), fl, off);
    enc.set_output_array(o);
  }
  for (auto& i : inputs) enc.set_input_array(i);
  enc.dispatch([kind = kind_, cfg = cfg_, inputs, outputs]() mutable {
    try {
      run(kind, cfg, inputs, outputs);
    } catch (const std::exception& e) {
      // the stream's thread cannot raise into Python: report and return NaN rather than abort
      std::fprintf(stderr, "natten_mlx_nanobind: %s failed: %s; its outputs are NaN\n", kind_name(kind), e.what());
      for (auto& o : outputs) {
        if (o.dtype() == mx::float32) fill_nan_t<float>(o);
        else if (o.dtype() == mx::float16) fill_nan_t<mx::float16_t>(o);
        else if (o.dtype() == mx::bfloat16) fill_nan_t<mx::bfloat16_t>(o);
      }
    }
    upper_before.store(avx_upper_in_use());
    clear_upper_state();
    upper_after.store(avx_upper_in_use());
  });
}

void NAOp::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("natten_mlx_nanobind runs on CPU streams only; the GPU tiers serve GPU streams");
}

std::vector<mx::array> NAOp::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                 const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  OpKind bwd;
  switch (kind_) {
    case OpKind::FusedFwd: bwd = OpKind::FusedBwd; break;
    case OpKind::QkFwd: bwd = OpKind::QkBwd; break;
    case OpKind::AvFwd: bwd = OpKind::AvBwd; break;
    default:
      throw std::invalid_argument(
          "natten_mlx_nanobind: second-order gradients of neighborhood attention are not implemented");
  }
  std::vector<mx::array> ins = primals;
  if (kind_ == OpKind::FusedFwd) {
    ins.push_back(outputs[0]);
    ins.push_back(outputs[1]);
    ins.push_back(cotangents[0]);
    ins.push_back(cotangents.size() > 1 ? cotangents[1] : mx::zeros_like(outputs[1], stream()));
  } else {
    ins.push_back(cotangents[0]);
  }
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (auto& p : primals) {
    shapes.push_back(p.shape());
    dtypes.push_back(p.dtype());
  }
  auto grads = mx::array::make_arrays(std::move(shapes), dtypes, std::make_shared<NAOp>(stream(), bwd, cfg_), ins);
  std::vector<mx::array> res;
  for (int a : argnums) res.push_back(grads[a]);
  return res;
}

std::vector<mx::array> NAOp::jvp(const std::vector<mx::array>&, const std::vector<mx::array>&, const std::vector<int>&) {
  throw std::invalid_argument("natten_mlx_nanobind: forward-mode differentiation (jvp) is not implemented; use mx.vjp/mx.grad");
}

std::pair<std::vector<mx::array>, std::vector<int>> NAOp::vmap(const std::vector<mx::array>&, const std::vector<int>&) {
  throw std::invalid_argument(
      "natten_mlx_nanobind: mx.vmap over neighborhood attention is not supported; the batch axis B already "
      "batches the op (reshape the mapped axis into B)");
}

const char* NAOp::name() const { return kind_name(kind_); }

bool NAOp::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const NAOp*>(&other);
  return o && o->kind_ == kind_ && o->cfg_ == cfg_;
}

std::vector<mx::Shape> NAOp::output_shapes(const std::vector<mx::array>& in) {
  const Slots s = slots_of(kind_, cfg_);
  switch (kind_) {
    case OpKind::FusedFwd: {
      mx::Shape out = in[s.q].shape();
      out.back() = in[s.v].shape(-1);
      mx::Shape lse(in[s.q].shape().begin(), in[s.q].shape().end() - 1);
      return {out, lse};
    }
    case OpKind::QkFwd: {
      mx::Shape out = in[s.q].shape();
      int w = 1;
      for (int a = 0; a < cfg_.nd; ++a) w *= cfg_.K[a];
      out.back() = w + (cfg_.extra ? in[s.ek].shape(1) : 0);
      return {out};
    }
    case OpKind::AvFwd: {
      mx::Shape out = in[s.attn].shape();
      out.back() = in[s.v].shape(-1);
      return {out};
    }
    default: {
      std::vector<mx::Shape> shapes;
      for (int i = 0; i < s.n_primals; ++i) shapes.push_back(in[i].shape());
      return shapes;
    }
  }
}

// ---------------------------------------------------------------- op builders
std::vector<mx::array> op_fused_forward(const mx::array& q, const mx::array& k, const mx::array& v, const Opt& ek,
                                     const Opt& ev, const Opt& rpb, const std::vector<int>& kernel_size,
                                     const std::vector<int>& stride, const std::vector<int>& dilation,
                                     const std::vector<bool>& is_causal, std::optional<double> scale,
                                     const std::optional<std::vector<int>>& domain,
                                     const std::optional<std::vector<int>>& query_offset,
                                     const std::optional<std::vector<int>>& kv_offset, mx::StreamOrDevice s) {
  const int rank = static_cast<int>(q.ndim());
  const char* layout = "[B, *spatial, H, D]";
  const bool sub = domain.has_value() || query_offset.has_value() || kv_offset.has_value();
  check_float("query", q);
  check_float("key", k);
  check_float("value", v);
  if (rank < 4 || rank > 6) fail("query has shape " + shape_str(q) + "; expected [B, *spatial(1-3 axes), H, D]");
  check_rank("key", k, rank, layout);
  check_rank("value", v, rank, layout);
  const int nd = rank - 3;
  check_same("batch", q, "query", k, "key", 1);
  check_same("batch and spatial shape", k, "key", v, "value", nd + 1);
  if (!sub) check_same("batch and spatial shape", q, "query", k, "key", nd + 1);
  if (k.shape(-1) != q.shape(-1)) fail("key head dim differs from query head dim");
  if (k.shape(-2) != v.shape(-2)) fail("key and value need the same number of heads H_kv");
  if (q.shape(-2) % k.shape(-2) != 0) fail("H % H_kv must be 0 (query " + shape_str(q) + ", key " + shape_str(k) + ")");
  Config c;
  if (sub) {
    if (!domain || !query_offset || !kv_offset) fail("a sub-domain call needs domain, query_offset and kv_offset");
    for (const auto* x : {&*domain, &*query_offset, &*kv_offset})
      if (static_cast<int>(x->size()) != nd) fail("domain, query_offset and kv_offset need one entry per spatial axis");
    // the window rules apply to the global domain: validate the geometry against it
    mx::Shape gshape = q.shape();
    for (int a = 0; a < nd; ++a) gshape[1 + a] = (*domain)[a];
    c = make_config(nd, kernel_size, stride, dilation, is_causal, mx::zeros(gshape, mx::float32));
    c.sub = true;
    for (int a = 0; a < nd; ++a) {
      const int L = (*domain)[a], qo = (*query_offset)[a], ko = (*kv_offset)[a];
      const int lq = q.shape(1 + a), lk = k.shape(1 + a);
      if (qo < 0 || ko < 0 || qo + lq > L || ko + lk > L)
        fail("sub-domain axis " + std::to_string(a) + ": queries [" + std::to_string(qo) + ", " + std::to_string(qo + lq) +
             ") and keys [" + std::to_string(ko) + ", " + std::to_string(ko + lk) + ") must lie in the domain [0, " +
             std::to_string(L) + ")");
      // every window of the local queries must lie in the key slab
      for (int i = qo; i < qo + lq; ++i) {
        const int first = na_key_first(i, L, c.K[a], c.S[a], c.Dl[a], c.C[a]);
        const int last = first + (na_key_count(i, L, c.K[a], c.S[a], c.Dl[a], c.C[a]) - 1) * c.Dl[a];
        if (first < ko || last >= ko + lk)
          fail("sub-domain axis " + std::to_string(a) + ": the window of global query " + std::to_string(i) +
               " needs keys [" + std::to_string(first) + ", " + std::to_string(last + 1) + ") outside the key slab [" +
               std::to_string(ko) + ", " + std::to_string(ko + lk) + ")");
      }
      c.dom[a] = L, c.qoff[a] = qo, c.koff[a] = ko;
    }
  } else {
    c = make_config(nd, kernel_size, stride, dilation, is_causal, q);
  }
  c.scale = scale_of(scale, q.shape(-1));
  std::vector<mx::array> ins = {q, k, v};
  if (ek.has_value() != ev.has_value()) fail("additional_keys and additional_values come in pairs");
  if (ek) {
    int64_t num = 0;
    check_extra("additional_keys", *ek, q, k.shape(-2), q.shape(-1), &num);
    check_extra("additional_values", *ev, q, k.shape(-2), v.shape(-1), &num);
    ins.push_back(*ek);
    ins.push_back(*ev);
    c.extra = true;
  }
  if (rpb) {
    check_rpb(*rpb, q.shape(-2), c);
    ins.push_back(*rpb);
    c.rpb = true;
  }
  check_dtypes(ins);
  mx::Stream st = cpu_stream(s);
  mx::Shape out = q.shape();
  out.back() = v.shape(-1);
  mx::Shape lse(q.shape().begin(), q.shape().end() - 1);
  return mx::array::make_arrays({out, lse}, {q.dtype(), mx::float32}, std::make_shared<NAOp>(st, OpKind::FusedFwd, c),
                                ins);
}

mx::array op_qk_forward(const mx::array& q, const mx::array& k, const Opt& ek, const Opt& rpb,
                     const std::vector<int>& kernel_size, const std::vector<int>& stride,
                     const std::vector<int>& dilation, const std::vector<bool>& is_causal,
                     std::optional<double> scale, mx::StreamOrDevice s) {
  const int rank = static_cast<int>(q.ndim());
  check_float("query", q);
  check_float("key", k);
  if (rank < 4 || rank > 6) fail("query has shape " + shape_str(q) + "; expected [B, *spatial(1-3 axes), H, D]");
  check_rank("key", k, rank, "[B, *spatial, H, D]");
  const int nd = rank - 3;
  check_same("batch and spatial shape", q, "query", k, "key", nd + 1);
  if (k.shape(-1) != q.shape(-1)) fail("key head dim differs from query head dim");
  if (q.shape(-2) % k.shape(-2) != 0) fail("H % H_kv must be 0");
  Config c = make_config(nd, kernel_size, stride, dilation, is_causal, q);
  c.scale = scale_of(scale, q.shape(-1));
  std::vector<mx::array> ins = {q, k};
  int w = 1;
  for (int a = 0; a < nd; ++a) w *= c.K[a];
  if (ek) {
    int64_t num = 0;
    check_extra("additional_keys", *ek, q, k.shape(-2), q.shape(-1), &num);
    ins.push_back(*ek);
    c.extra = true;
    w += static_cast<int>(num);
  }
  if (rpb) {
    check_rpb(*rpb, q.shape(-2), c);
    ins.push_back(*rpb);
    c.rpb = true;
  }
  check_dtypes(ins);
  mx::Stream st = cpu_stream(s);
  mx::Shape out = q.shape();
  out.back() = w;
  return mx::array::make_arrays({out}, {q.dtype()}, std::make_shared<NAOp>(st, OpKind::QkFwd, c), ins)[0];
}

mx::array op_av_forward(const mx::array& attn, const mx::array& v, const Opt& ev, const std::vector<int>& kernel_size,
                     const std::vector<int>& stride, const std::vector<int>& dilation,
                     const std::vector<bool>& is_causal, mx::StreamOrDevice s) {
  const int rank = static_cast<int>(attn.ndim());
  check_float("attn", attn);
  check_float("value", v);
  if (rank < 4 || rank > 6) fail("attn has shape " + shape_str(attn) + "; expected [B, *spatial(1-3 axes), H, K_total]");
  check_rank("value", v, rank, "[B, *spatial, H_kv, D_v]");
  const int nd = rank - 3;
  check_same("batch and spatial shape", attn, "attn", v, "value", nd + 1);
  if (attn.shape(-2) % v.shape(-2) != 0) fail("H % H_kv must be 0");
  Config c = make_config(nd, kernel_size, stride, dilation, is_causal, attn);
  c.scale = 1.f;
  std::vector<mx::array> ins = {attn, v};
  int64_t w = 1;
  for (int a = 0; a < nd; ++a) w *= c.K[a];
  if (ev) {
    int64_t num = 0;
    check_extra("additional_values", *ev, attn, v.shape(-2), v.shape(-1), &num);
    ins.push_back(*ev);
    c.extra = true;
    w += num;
  }
  if (attn.shape(-1) != w)
    fail("attn has " + std::to_string(attn.shape(-1)) + " weights per query; the window (plus extra values) needs " +
         std::to_string(w));
  check_dtypes(ins);
  mx::Stream st = cpu_stream(s);
  mx::Shape out = attn.shape();
  out.back() = v.shape(-1);
  return mx::array::make_arrays({out}, {attn.dtype()}, std::make_shared<NAOp>(st, OpKind::AvFwd, c), ins)[0];
}

}  // namespace na
