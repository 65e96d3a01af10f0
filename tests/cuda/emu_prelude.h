// CPU emulator of the CUDA built-ins natten-mlx's kernels use, so that the exact kernel text that
// mx.fast.cuda_kernel compiles also runs here under g++ (tests/cuda/emu.py). One OS thread per CUDA
// thread; __syncthreads is a block barrier; warp shuffles and mma.sync are warp collectives that
// exchange lane values through per-warp buffers; cp.async copies at once. Half and bfloat16 are
// bit-exact IEEE conversions with round-to-nearest-even.
#pragma once
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define NA_EMU 1
#define NA_FUNC inline
#define __global__
#define __device__
#define __forceinline__
#define __align__(x) alignas(x)

struct na_dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local na_dim3 threadIdx, blockIdx;
inline na_dim3 blockDim, gridDim;

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned na_bits(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }

struct __half { uint16_t x; };
struct __half2 { __half a, b; };
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 a, b; };
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct alignas(16) float4 { float x, y, z, w; };

inline float na_half_bits_to_float(uint16_t h) {
  unsigned s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
  float v;
  if (e == 0) v = std::ldexp((float)m, -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp((float)(m | 1024), (int)e - 25);
  return s ? -v : v;
}
inline uint16_t na_float_to_half_bits(float f) {
  unsigned u = na_bits(f);
  unsigned s = (u >> 16) & 0x8000;
  float a = std::fabs(f);
  if (std::isnan(f)) return (uint16_t)(s | 0x7e00);
  if (a >= 65520.f) return (uint16_t)(s | 0x7c00);
  if (a < std::ldexp(1.f, -14)) {  // subnormal: multiples of 2^-24, ties to even by nearbyint
    float q = std::nearbyint(a * std::ldexp(1.f, 24));
    return (uint16_t)(s | (unsigned)q);
  }
  int e;
  float fr = std::frexp(a, &e);  // a = fr * 2^e, fr in [0.5, 1)
  float q = std::nearbyint(fr * 2048.f);  // 11 significant bits
  if (q >= 2048.f) { q /= 2; e += 1; }
  unsigned exp = (unsigned)(e - 1 + 15), man = (unsigned)q - 1024;
  if (exp >= 31) return (uint16_t)(s | 0x7c00);
  return (uint16_t)(s | (exp << 10) | man);
}
inline float na_bf16_bits_to_float(uint16_t h) { unsigned u = (unsigned)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t na_float_to_bf16_bits(float f) {
  unsigned u = na_bits(f);
  if (std::isnan(f)) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
inline float __half2float(__half h) { return na_half_bits_to_float(h.x); }
inline __half __float2half_rn(float f) { return __half{na_float_to_half_bits(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return na_bf16_bits_to_float(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{na_float_to_bf16_bits(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }

// ---- block and warp machinery ----
struct NaBarrier {
  std::mutex mu;
  std::condition_variable cv;
  int count = 0, total = 0;
  long gen = 0;
  void wait() {
    std::unique_lock<std::mutex> lk(mu);
    long g = gen;
    if (++count == total) { count = 0; ++gen; cv.notify_all(); return; }
    cv.wait(lk, [&] { return gen != g; });
  }
};
struct NaWarp {
  NaBarrier bar;
  float a[32][8], b[32][4], c[32][4];
  float x[32];
};
struct NaBlock {
  NaBarrier bar;
  std::vector<NaWarp*> warps;
  std::vector<unsigned char> smem;
};
inline thread_local NaBlock* na_block = nullptr;
inline std::mutex na_atomic_mu;

inline void __syncthreads() { na_block->bar.wait(); }
inline NaWarp& na_warp() { return *na_block->warps[threadIdx.x / 32]; }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  NaWarp& w = na_warp();
  int lane = threadIdx.x & 31;
  w.x[lane] = v;
  w.bar.wait();
  float r = w.x[lane ^ m];
  w.bar.wait();
  return r;
}
inline float na_exp2(float x) { return std::exp2(x); }
inline int __any_sync(unsigned, int pred) {
  NaWarp& w = na_warp();
  int lane = threadIdx.x & 31;
  w.x[lane] = pred ? 1.f : 0.f;
  w.bar.wait();
  int any = 0;
  for (int i = 0; i < 32; ++i) any |= w.x[i] != 0.f;
  w.bar.wait();
  return any;
}
inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> lk(na_atomic_mu);
  float o = *p;
  *p = o + v;
  return o;
}

template <typename T> inline float na_emu_elem(unsigned reg, int i);
template <> inline float na_emu_elem<__half>(unsigned reg, int i) { return na_half_bits_to_float((uint16_t)(reg >> (16 * i))); }
template <> inline float na_emu_elem<__nv_bfloat16>(unsigned reg, int i) { return na_bf16_bits_to_float((uint16_t)(reg >> (16 * i))); }

// A operand fragments (mma.sync's, also wgmma's register operand) through the warp's buffer: each lane
// puts its four registers, then any lane reads element (row, k) of the warp's 16 x 16 A
template <typename T> inline void na_emu_put_a(NaWarp& w, int lane, const unsigned* a) {
  for (int r = 0; r < 4; ++r) { w.a[lane][2 * r] = na_emu_elem<T>(a[r], 0); w.a[lane][2 * r + 1] = na_emu_elem<T>(a[r], 1); }
}
inline float na_emu_a(const NaWarp& w, int row, int k) {
  const int ln = (row % 8) * 4 + (k % 8) / 2, reg = (k >= 8 ? 2 : 0) + (row >= 8 ? 1 : 0);
  return w.a[ln][reg * 2 + k % 2];
}
// mma.sync.m16n8k16.row.col with float accumulators, fragment layout as in common.cuh
template <typename T> inline void na_mma(float* c, const unsigned* a, const unsigned* b) {
  NaWarp& w = na_warp();
  int lane = threadIdx.x & 31;
  na_emu_put_a<T>(w, lane, a);
  for (int r = 0; r < 2; ++r) { w.b[lane][2 * r] = na_emu_elem<T>(b[r], 0); w.b[lane][2 * r + 1] = na_emu_elem<T>(b[r], 1); }
  w.bar.wait();
  auto A = [&](int row, int k) { return na_emu_a(w, row, k); };
  auto Bm = [&](int k, int n) { int ln = n * 4 + (k % 8) / 2; int reg = k >= 8 ? 1 : 0; return w.b[ln][reg * 2 + k % 2]; };
  int gid = lane / 4, tig = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    int row = gid + (e >= 2 ? 8 : 0), col = tig * 2 + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * Bm(k, col);
    out[e] = acc;
  }
  w.bar.wait();
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

// ldmatrix.x4 (.trans): lane l gives a row address of matrix l / 8
struct NaLdsm { const uint16_t* rows[32]; };
inline NaLdsm na_ldsm_slots[64];  // one per warp of a block (blocks run one at a time)
inline void na_ldsm_any(unsigned* out, const void* row, bool trans) {
  NaWarp& w = na_warp();
  int lane = threadIdx.x & 31, wi = threadIdx.x / 32;
  na_ldsm_slots[wi].rows[lane] = (const uint16_t*)row;
  w.bar.wait();
  for (int i = 0; i < 4; ++i) {
    const uint16_t* const* mrows = na_ldsm_slots[wi].rows + 8 * i;
    uint16_t lo, hi;
    if (!trans) { lo = mrows[lane / 4][2 * (lane % 4)]; hi = mrows[lane / 4][2 * (lane % 4) + 1]; }
    else { lo = mrows[2 * (lane % 4)][lane / 4]; hi = mrows[2 * (lane % 4) + 1][lane / 4]; }
    out[i] = (unsigned)lo | ((unsigned)hi << 16);
  }
  w.bar.wait();
}
inline void na_ldsm_x4(unsigned* r, const void* row) { na_ldsm_any(r, row, false); }
inline void na_ldsm_x4_t(unsigned* r, const void* row) { na_ldsm_any(r, row, true); }

inline void na_cp_async16(void* smem, const void* gmem, bool valid) {
  if (valid) std::memcpy(smem, gmem, 16); else std::memset(smem, 0, 16);
}
inline void na_cp_commit() {}
inline void na_cp_wait_all() {}
inline void na_cp_wait_one() {}
template <int N> inline void na_cp_wait() {}
#define NA_SHARED_DECL unsigned char* na_smem = na_block->smem.data()

// ---- warpgroup MMA (common.cuh's na_wg_*): computed at issue (commit, wait and fences do nothing;
// the kernels wait before reading the accumulators, so issue-time results are what they read). Shared
// addresses are offsets into the block's shared memory; the 128-byte swizzle is applied to them as the
// hardware applies it to shared addresses (bits 4-6 ^= bits 7-9).
inline unsigned na_smem_addr(const void* p) { return (unsigned)((const unsigned char*)p - na_block->smem.data()); }
inline void na_wg_fence() {}
inline void na_wg_commit() {}
template <int N> inline void na_wg_wait() {}
inline void na_fence_proxy_async() {}
inline void na_wg_pin(float&) {}
template <typename T> inline float na_wg_elem(unsigned addr) {
  addr ^= ((addr >> 7) & 7u) << 4;
  uint16_t bits;
  std::memcpy(&bits, na_block->smem.data() + addr, 2);
  return na_emu_elem<T>((unsigned)bits, 0);
}
// K-major operand: element (row, k) of the k step starting at start (row groups of 8 SBO = 1024 apart)
template <typename T> inline float na_wg_kmajor(unsigned start, int row, int k) {
  return na_wg_elem<T>(start + (row >> 3) * 1024u + (row & 7) * 128u + (k >> 3) * 16u + (k & 7) * 2u);
}
template <typename T> inline void na_wg_ss(float* d, const void* a, const void* b, int acc) {
  const unsigned sa = na_smem_addr(a), sb = na_smem_addr(b);
  const int lane = threadIdx.x & 31, w4 = (threadIdx.x >> 5) & 3, gid = lane / 4, tig = lane % 4;
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * w4 + gid + 8 * (e >> 1), col = 8 * j + 2 * tig + (e & 1);
      float sum = acc ? d[4 * j + e] : 0.f;
      for (int k = 0; k < 16; ++k) sum += na_wg_kmajor<T>(sa, row, k) * na_wg_kmajor<T>(sb, col, k);
      d[4 * j + e] = sum;
    }
}
template <typename T> inline void na_wg_rs(float* d, const unsigned* a, const void* b, int acc) {
  NaWarp& w = na_warp();
  const int lane = threadIdx.x & 31, gid = lane / 4, tig = lane % 4;
  na_emu_put_a<T>(w, lane, a);
  w.bar.wait();
  auto A = [&](int row, int k) { return na_emu_a(w, row, k); };
  const unsigned sb = na_smem_addr(b);
  float out[32];
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = gid + 8 * (e >> 1), col = 8 * j + 2 * tig + (e & 1);
      float sum = acc ? d[4 * j + e] : 0.f;
      // MN-major B: one 128-byte row of 64 columns per k, 8-k groups 1024 bytes apart
      for (int k = 0; k < 16; ++k)
        sum += A(row, k) * na_wg_elem<T>(sb + (k >> 3) * 1024u + (k & 7) * 128u + (col >> 3) * 16u + (col & 7) * 2u);
      out[4 * j + e] = sum;
    }
  w.bar.wait();
  for (int i = 0; i < 32; ++i) d[i] = out[i];
}

// namespace cg = cooperative_groups in MLX's wrapper
namespace cooperative_groups {}

// Run fn once per CUDA thread of a grid of (gx, gy, gz) blocks of tx threads.
inline void na_emu_run(int gx, int gy, int gz, int tx, int shared, const std::function<void()>& fn) {
  blockDim = na_dim3{(unsigned)tx, 1, 1};
  gridDim = na_dim3{(unsigned)gx, (unsigned)gy, (unsigned)gz};
  for (int bz = 0; bz < gz; ++bz)
    for (int by = 0; by < gy; ++by)
      for (int bx = 0; bx < gx; ++bx) {
        NaBlock blk;
        blk.bar.total = tx;
        blk.smem.assign((size_t)shared + 16, 0xAB);  // garbage, as real shared memory
        int nw = (tx + 31) / 32;
        std::vector<NaWarp> ws(nw);
        for (int i = 0; i < nw; ++i) { ws[i].bar.total = (i == nw - 1 && tx % 32) ? tx % 32 : 32; blk.warps.push_back(&ws[i]); }
        std::vector<std::thread> th;
        for (int t = 0; t < tx; ++t)
          th.emplace_back([&, t] {
            threadIdx = na_dim3{(unsigned)t, 0, 0};
            blockIdx = na_dim3{(unsigned)bx, (unsigned)by, (unsigned)bz};
            na_block = &blk;
            fn();
          });
        for (auto& t : th) t.join();
      }
}
