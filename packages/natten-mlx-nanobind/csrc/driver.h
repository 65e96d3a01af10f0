// Tile drivers of neighborhood attention over float32 arrays in a canonical head-major layout:
//   q [B][H][N][D], k [B][Hkv][N][D], v [B][Hkv][N][Dv], extra keys/values [B][Hkv][E][D|Dv],
//   rpb [H][R] (R = prod(2K-1)), out [B][H][N][Dv], lse [B][H][N], scores/attn [B][H][N][Kt+E].
// N is the row-major flattening of the spatial axes; 1D and 2D problems are 3D problems whose
// leading axes have length 1 and kernel 1. ops.cpp converts to and from MLX arrays.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace na {

struct Geo {
  int L[3], K[3], S[3], Dl[3];
  bool C[3];
  int64_t N;  // L0 * L1 * L2 query tokens
  // Sub-domains (sharded attention): the windows follow the global axis lengths dom; local query i
  // is global i + qoff, local key j is global j + koff, and the key slab has shape Lk (Nk tokens).
  // A plain problem has dom = Lk = L and zero offsets.
  int Lk[3], dom[3], qoff[3], koff[3];
  int64_t Nk;
  int64_t B, H, Hkv, G, D, Dv, E;
  // Token strides (floats) of the fused ops' q, k, v: H * D, Hkv * D, Hkv * Dv for MLX's contiguous arrays, more
  // for views whose heads are contiguous within a token (slices of a fused qkv projection), read in place;
  // 0 means contiguous (fused_forward / fused_backward fill them in)
  int64_t tq, tk, tv;
  int64_t R[3], Rtot;  // rpb extent per axis (2K-1) and in all
  int64_t Kt;          // K0 * K1 * K2 slots per query (split ops)
  float scale;
  bool has_rpb;
};

// The forward reads and writes MLX's own heads-last layout (q [B][N][H][D], k/v [B][Nk][Hkv][D|Dv],
// extras [B][E][Hkv][D|Dv], out [B][N][H][Dv], lse [B][N][H]), so float32 inputs are used in place.
struct FwdArgs {
  const float *q, *k, *v, *ek, *ev, *rpb;  // ek/ev/rpb null when absent
  float *out, *lse;
  // out is the op's own output (not scratch converted after): non-temporal stores may write it
  bool final_out = false;
};

// Gradients in the inputs' heads-last layout (dq [B][N][H][D], dk/dv [B][Nk][Hkv][D|Dv], dek/dev
// [B][E][Hkv][D|Dv]); drpb [H][R].
struct BwdArgs {
  const float *q, *k, *v, *ek, *ev, *rpb, *out, *lse, *dout, *dlse;  // dlse may be null
  float *dq, *dk, *dv, *dek, *dev, *drpb;
  // dq, dk and dv are the op's own outputs (as FwdArgs::final_out)
  bool final_out = false;
};

void fused_forward(const Geo& g, const FwdArgs& a);
void fused_backward(const Geo& g, const BwdArgs& a);

// split ops (exact per-slot loops; not the fast path)
void qk_forward(const Geo& g, const float* q, const float* k, const float* ek, const float* rpb, float* scores);
void qk_backward(const Geo& g, const float* q, const float* k, const float* ek, const float* ds, float* dq, float* dk,
                 float* dek, float* drpb);
void av_forward(const Geo& g, const float* attn, const float* v, const float* ev, float* out);
void av_backward(const Geo& g, const float* attn, const float* v, const float* ev, const float* dout, float* dattn,
                 float* dv, float* dev);

// run fn(i) for i in [0, n) on the shared pool (the caller works too); serialises concurrent callers
void parallel_for(int64_t n, void (*fn)(int64_t, void*), void* ctx);
template <class F>
void parallel_for(int64_t n, F&& f) {
  parallel_for(n, [](int64_t i, void* c) { (*static_cast<F*>(c))(i); }, &f);
}
int num_threads();
// queries served since the last reset: forward exact-window runs, border blocks, tiles; backward the same;
// then the forward and backward calls whose streamed keys and values took a ring of row slots, and the
// backward calls whose key-side sums did, the forward calls whose P.V read heads-last value rows
// (exact_fwd2r), the forward and backward calls that wrote their outputs with non-temporal stores, and the
// forward and backward calls that read q, k or v in place from a view with a longer token stride (Geo::tq)
std::vector<int64_t> path_counts(bool reset);

// Per-thread scratch buffers reused from call to call (fresh pages cost more than the work on small
// problems). scratch_reset() starts a call; scratch(n) hands out the next buffer of >= n floats, valid
// until the next reset on this thread; contents are unspecified unless zero is set.
void scratch_reset();
float* scratch(size_t n, bool zero = false);
const char* simd_name();

}  // namespace na
