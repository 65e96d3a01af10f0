// metal_shim.h: the part of the Metal Shading Language (and of what MLX prepends to a
// metal_kernel, metal::utils()) that natten-mlx's kernels use, as C++17 for the CPU emulator.
//
// Memory is checked: device, constant and threadgroup pointers are wrapper types (the emulator's
// source rewriting turns `device T*` into emu::dptr<T> and `threadgroup T a[N];` into
// emu::tg_array<T, N>), every element access is bounds-checked, and accesses to outputs and
// threadgroup memory are recorded per element to report races (see emu_runtime.h, Shadow) and
// reads of memory nothing wrote. An out-of-bounds access is reported and then served from a
// scratch buffer, so the kernel runs on and every error of a launch is listed.
//
// Deliberately absent: <cmath> and friends. Metal's math functions live in namespace metal and
// are defined here; a kernel that calls one this shim lacks fails to compile instead of silently
// binding to a C library function with other semantics.
#ifndef NATTEN_MLX_METAL_SHIM_H
#define NATTEN_MLX_METAL_SHIM_H

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#include "emu_runtime.h"

// ---- address spaces and attributes: pointer types are rewritten; what is left is a no-op ----
#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline
#define MLX_MTL_PRAGMA_UNROLL
#define STEEL_PRAGMA_UNROLL

typedef uint32_t uint;
typedef uint16_t ushort;
typedef uint8_t uchar;
typedef uint64_t ulong;

// ---- half and bfloat ----
typedef _Float16 half;

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  // round to nearest even, as the GPU's float -> bfloat conversion
  bfloat(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) {
      bits = (uint16_t)((u >> 16) | 0x40);
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = (uint16_t)(u >> 16);
    }
  }
  bfloat(double d) : bfloat((float)d) {}
  bfloat(int i) : bfloat((float)i) {}
  bfloat(half h) : bfloat((float)h) {}
  operator float() const {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat bfloat16_t;
typedef half float16_t;

// ---- vectors (the members and operators the kernels use) ----
template <class T, int N>
struct vec;
template <class T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  constexpr vec(T a, T b) : x(a), y(b) {}
  explicit constexpr vec(T a) : x(a), y(a) {}
  T& operator[](int i) { return i == 0 ? x : y; }
  const T& operator[](int i) const { return i == 0 ? x : y; }
};
template <class T>
struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  constexpr vec(T a, T b, T c) : x(a), y(b), z(c) {}
  explicit constexpr vec(T a) : x(a), y(a), z(a) {}
  T& operator[](int i) { return i == 0 ? x : i == 1 ? y : z; }
  const T& operator[](int i) const { return i == 0 ? x : i == 1 ? y : z; }
};
template <class T>
struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  constexpr vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  explicit constexpr vec(T a) : x(a), y(a), z(a), w(a) {}
  T& operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
  const T& operator[](int i) const { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
};
#define NA_EMU_VEC(T, name) \
  typedef vec<T, 2> name##2;  \
  typedef vec<T, 3> name##3;  \
  typedef vec<T, 4> name##4;
NA_EMU_VEC(float, float)
NA_EMU_VEC(half, half)
NA_EMU_VEC(int, int)
NA_EMU_VEC(uint, uint)
NA_EMU_VEC(short, short)
NA_EMU_VEC(ushort, ushort)
NA_EMU_VEC(ulong, ulong)
#undef NA_EMU_VEC

// ---- constants ----
#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))
#define HUGE_VALF (__builtin_huge_valf())
#define FLT_MAX 3.40282347e+38F
#define FLT_MIN 1.17549435e-38F
#define M_LOG2E_F 1.44269504088896340736f
#define M_LN2_F 0.69314718055994530942f
#define M_E_F 2.71828182845904523536f

// ---- metal:: math (float; half and bfloat arguments go through float) ----
namespace metal {
#define NA_EMU_F1(name, builtin)                                 \
  inline float name(float x) { return builtin(x); }              \
  inline half name(half x) { return (half)builtin((float)x); }
NA_EMU_F1(exp, __builtin_expf)
NA_EMU_F1(exp2, __builtin_exp2f)
NA_EMU_F1(log, __builtin_logf)
NA_EMU_F1(log2, __builtin_log2f)
NA_EMU_F1(sqrt, __builtin_sqrtf)
NA_EMU_F1(fabs, __builtin_fabsf)
NA_EMU_F1(abs, __builtin_fabsf)
NA_EMU_F1(floor, __builtin_floorf)
NA_EMU_F1(ceil, __builtin_ceilf)
NA_EMU_F1(tanh, __builtin_tanhf)
#undef NA_EMU_F1
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float pow(float x, float y) { return __builtin_powf(x, y); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline half max(half a, half b) { return (half)__builtin_fmaxf((float)a, (float)b); }
inline half min(half a, half b) { return (half)__builtin_fminf((float)a, (float)b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a > b ? a : b; }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline float clamp(float x, float lo, float hi) { return min(max(x, lo), hi); }
inline int clamp(int x, int lo, int hi) { return min(max(x, lo), hi); }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }
namespace fast {
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float log2(float x) { return __builtin_log2f(x); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float log2(float x) { return __builtin_log2f(x); }
}  // namespace precise

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return (mem_flags)((int)a | (int)b); }
}  // namespace metal
using namespace metal;

// MLX's utils(): the parts the kernels may use
template <typename U>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float max = __builtin_inff();
  static constexpr float min = -__builtin_inff();
  static constexpr float finite_max = 3.40282347e+38F;
  static constexpr float finite_min = -3.40282347e+38F;
};
template <>
struct Limits<int> {
  static constexpr int max = 2147483647;
  static constexpr int min = -2147483647 - 1;
  static constexpr int finite_max = max;
  static constexpr int finite_min = min;
};
template <typename T, typename U>
inline T ceildiv(T N, U M) { return (N + M - 1) / M; }

// ---- checked memory ----
namespace emu {

inline const char* kind_name(int k) {
  return k == BUF_INPUT ? "input" : k == BUF_OUTPUT ? "output" : k == BUF_THREADGROUP ? "threadgroup array" : "constant buffer";
}

inline void oob(const Buf* b, int64_t i, const char* what) {
  report("out-of-bounds %s of %s %s[%lld] (it has %lld elements) by thread (%u,%u,%u) of threadgroup (%u,%u,%u)",
         what, kind_name(b->kind), b->name, (long long)i, (long long)b->n, cur->pos_tg[0], cur->pos_tg[1],
         cur->pos_tg[2], cur->group[0], cur->group[1], cur->group[2]);
}

inline bool sg_ordered(int32_t other_tid, uint32_t other_sge) {
  // same simdgroup and a simdgroup synchronisation since the other access
  return (uint32_t)other_tid / 32 == cur->sg && grp->sg_epoch[cur->sg] > other_sge;
}

inline void note_read(const Buf* b, int64_t i) {
  Shadow& s = b->shadow[i];
  if (b->kind == BUF_THREADGROUP) {
    int32_t t = (int32_t)cur->tid;
    uint32_t e = grp->epoch, sge = grp->sg_epoch[cur->sg];
    if (s.w_tid < 0) {
      report("read of threadgroup %s[%lld] before any thread of threadgroup (%u,%u,%u) wrote it (thread %d)", b->name,
             (long long)i, cur->group[0], cur->group[1], cur->group[2], t);
    } else if (s.w_tid != t && s.w_epoch == e && !sg_ordered(s.w_tid, s.w_sge)) {
      report("race on threadgroup %s[%lld]: thread %d reads what thread %d wrote with no barrier between (threadgroup (%u,%u,%u))",
             b->name, (long long)i, t, s.w_tid, cur->group[0], cur->group[1], cur->group[2]);
    }
    if (s.r_epoch != e) {
      s.r_epoch = e;
      s.r_tid = t;
      s.r_sg = (int32_t)cur->sg;
      s.r_sge = sge;
    } else {
      if (s.r_tid != t) s.r_tid = -2;
      if (s.r_sg != (int32_t)cur->sg) s.r_sg = -1;
      if (sge > s.r_sge) s.r_sge = sge;
    }
  } else {
    int32_t g = (int32_t)cur->global_id;
    if (s.w_tid < 0) {
      if (!b->initialised)
        report("read of output %s[%lld] before it was written (no init_value: MLX leaves outputs uninitialised)", b->name,
               (long long)i);
    } else if (s.w_tid != g && !(s.w_group == (int32_t)cur->group_id && grp->epoch > s.w_epoch)) {
      report("race on output %s[%lld]: thread %d reads what thread %d wrote, unordered", b->name, (long long)i, g, s.w_tid);
    }
  }
}

inline void note_write(const Buf* b, int64_t i) {
  Shadow& s = b->shadow[i];
  if (b->kind == BUF_THREADGROUP) {
    int32_t t = (int32_t)cur->tid;
    uint32_t e = grp->epoch, sge = grp->sg_epoch[cur->sg];
    if (s.w_tid >= 0 && s.w_tid != t && s.w_epoch == e && !sg_ordered(s.w_tid, s.w_sge)) {
      report("race on threadgroup %s[%lld]: threads %d and %d write it with no barrier between (threadgroup (%u,%u,%u))",
             b->name, (long long)i, s.w_tid, t, cur->group[0], cur->group[1], cur->group[2]);
    } else if (s.r_epoch == e && s.r_tid != t && s.r_tid != -1 &&
               !(s.r_sg == (int32_t)cur->sg && sge > s.r_sge)) {
      report("race on threadgroup %s[%lld]: thread %d overwrites it while other threads read it in the same barrier "
             "interval (threadgroup (%u,%u,%u))",
             b->name, (long long)i, t, cur->group[0], cur->group[1], cur->group[2]);
    }
    s.w_tid = t;
    s.w_epoch = e;
    s.w_sge = sge;
  } else {
    int32_t g = (int32_t)cur->global_id;
    if (s.w_tid >= 0 && s.w_tid != g && !(s.w_group == (int32_t)cur->group_id && grp->epoch > s.w_epoch)) {
      report("race on output %s[%lld]: threads %d and %d both write it, unordered", b->name, (long long)i, s.w_tid, g);
    }
    s.w_tid = g;
    s.w_group = (int32_t)cur->group_id;
    s.w_epoch = grp->epoch;
  }
}

template <class T, int AS>
struct aptr;

// One element of checked memory: reads and writes go through here so they can be recorded.
template <class T, int AS>
struct ref {
  using V = typename std::remove_const<T>::type;
  const Buf* b;
  int64_t i;  // element index, already bounds-checked; -1: out of bounds (served by dummy)
  int64_t want;  // the index asked for (reported when out of bounds)
  V* addr() const { return i < 0 ? reinterpret_cast<V*>(dummy) : reinterpret_cast<V*>(b->data) + i; }
  V load() const {
    if (i < 0) {
      if (b) oob(b, want, "read");
      else report("read through a null pointer");
      return V();
    }
    if (b->shadow) note_read(b, i);
    return *addr();
  }
  operator V() const { return load(); }
  template <class W = V, typename std::enable_if<std::is_same<W, bfloat>::value, int>::type = 0>
  operator float() const { return (float)load(); }
  ref& operator=(const V& v) {
    static_assert(!std::is_const<T>::value, "write through a pointer to const");
    if (i < 0) {
      if (b) oob(b, want, "write");
      else report("write through a null pointer");
      return *this;
    }
    if (b->shadow) note_write(b, i);
    *addr() = v;
    return *this;
  }
  ref& operator=(const ref& o) { return *this = o.load(); }
  template <class U>
  ref& operator+=(const U& v) { return *this = (V)(load() + v); }
  template <class U>
  ref& operator-=(const U& v) { return *this = (V)(load() - v); }
  template <class U>
  ref& operator*=(const U& v) { return *this = (V)(load() * v); }
  aptr<T, AS> operator&() const;
};

// A pointer into one buffer (device, constant) or threadgroup array; `off` may leave the buffer
// (pointer arithmetic is free), only dereferencing is checked.
template <class T, int AS>
struct aptr {
  const Buf* b = nullptr;
  int64_t off = 0;
  aptr() = default;
  aptr(const Buf* b_, int64_t o) : b(b_), off(o) {}
  template <class U, typename std::enable_if<std::is_same<const U, T>::value && !std::is_same<U, T>::value, int>::type = 0>
  aptr(const aptr<U, AS>& o) : b(o.b), off(o.off) {}
  ref<T, AS> operator[](int64_t k) const {
    int64_t j = off + k;
    if (!b || j < 0 || j >= b->n) return ref<T, AS>{b, -1, j};
    return ref<T, AS>{b, j, j};
  }
  ref<T, AS> operator*() const { return (*this)[0]; }
  aptr operator+(int64_t k) const { return aptr(b, off + k); }
  aptr operator-(int64_t k) const { return aptr(b, off - k); }
  int64_t operator-(const aptr& o) const { return off - o.off; }
  aptr& operator+=(int64_t k) { off += k; return *this; }
  aptr& operator-=(int64_t k) { off -= k; return *this; }
  aptr& operator++() { ++off; return *this; }
  aptr& operator--() { --off; return *this; }
  aptr operator++(int) { aptr r = *this; ++off; return r; }
  bool operator==(const aptr& o) const { return b == o.b && off == o.off; }
  bool operator!=(const aptr& o) const { return !(*this == o); }
  bool operator<(const aptr& o) const { return off < o.off; }
};
template <class T, int AS>
inline aptr<T, AS> operator+(int64_t k, const aptr<T, AS>& p) { return p + k; }

template <class T, int AS>
aptr<T, AS> ref<T, AS>::operator&() const { return aptr<T, AS>(b, want); }

template <class T>
using dptr = aptr<T, 0>;
template <class T>
using tptr = aptr<T, 2>;
template <class T>
using cptr = aptr<T, 3>;

// `threadgroup T name[N];` in a kernel body: N must be a compile-time constant, as in Metal.
template <class T, int64_t N>
struct tg_array {
  static_assert(N > 0, "threadgroup array of size 0");
  Buf* b;
  tg_array(int site, const char* name) { tg_alloc(site, name, N, (int64_t)sizeof(T), &b); }
  tg_array(const tg_array&) = delete;
  ref<T, 2> operator[](int64_t k) const { return tptr<T>(b, 0)[k]; }
  operator tptr<T>() const { return tptr<T>(b, 0); }
  operator tptr<const T>() const { return tptr<const T>(b, 0); }
  tptr<T> operator+(int64_t k) const { return tptr<T>(b, k); }
};

// ---- simdgroup collectives ----
enum { OP_BARRIER = 1, OP_SUM, OP_MAX, OP_MIN, OP_SHUFFLE, OP_SHUFFLE_XOR, OP_SHUFFLE_DOWN, OP_SHUFFLE_UP,
       OP_BROADCAST, OP_MMA };

template <class T>
inline T lane_value(const char* slots, uint32_t lane) {
  T v;
  __builtin_memcpy(&v, slots + 64 * lane, sizeof(T));
  return v;
}

template <class T>
inline T shuffle_from(T x, int op, int64_t src, const char* what) {
  static_assert(sizeof(T) <= 64, "collective payload too large");
  uint32_t act;
  const char* s = simd_exchange(&x, (int)sizeof(T), op, &act);
  if (src < 0 || src >= 32 || !((act >> src) & 1u)) {
    report("%s: lane %u reads lane %lld, which is not active in simdgroup %u", what, cur->lane, (long long)src, cur->sg);
    return x;
  }
  return lane_value<T>(s, (uint32_t)src);
}

inline void lane_coord(uint32_t lane, int& row, int& col) {
  // Apple's simdgroup_matrix<T,8,8> lane layout: lane holds (row, col) and (row, col + 1)
  int qid = (int)lane / 4;
  row = (qid & 4) + ((int)lane / 2) % 4;
  col = (qid & 2) * 2 + ((int)lane % 2) * 2;
}

}  // namespace emu

namespace metal {
template <class T>
inline T simd_sum(T x) {
  uint32_t act;
  const char* s = emu::simd_exchange(&x, (int)sizeof(T), emu::OP_SUM, &act);
  T r = T(0);
  for (uint32_t l = 0; l < 32; ++l)
    if ((act >> l) & 1u) r = r + emu::lane_value<T>(s, l);
  return r;
}
template <class T>
inline T simd_max(T x) {
  uint32_t act;
  const char* s = emu::simd_exchange(&x, (int)sizeof(T), emu::OP_MAX, &act);
  T r = x;
  for (uint32_t l = 0; l < 32; ++l)
    if ((act >> l) & 1u) r = max(r, emu::lane_value<T>(s, l));
  return r;
}
template <class T>
inline T simd_min(T x) {
  uint32_t act;
  const char* s = emu::simd_exchange(&x, (int)sizeof(T), emu::OP_MIN, &act);
  T r = x;
  for (uint32_t l = 0; l < 32; ++l)
    if ((act >> l) & 1u) r = min(r, emu::lane_value<T>(s, l));
  return r;
}
template <class T>
inline T simd_shuffle(T x, ushort lane) { return emu::shuffle_from(x, emu::OP_SHUFFLE, lane, "simd_shuffle"); }
template <class T>
inline T simd_broadcast(T x, ushort lane) { return emu::shuffle_from(x, emu::OP_BROADCAST, lane, "simd_broadcast"); }
template <class T>
inline T simd_shuffle_xor(T x, ushort mask) {
  return emu::shuffle_from(x, emu::OP_SHUFFLE_XOR, (int64_t)(emu::cur->lane ^ mask), "simd_shuffle_xor");
}
// Lanes whose source is outside the simdgroup keep their own value (Metal does not wrap).
template <class T>
inline T simd_shuffle_down(T x, ushort delta) {
  int64_t src = (int64_t)emu::cur->lane + delta;
  uint32_t act;
  const char* s = emu::simd_exchange(&x, (int)sizeof(T), emu::OP_SHUFFLE_DOWN, &act);
  if (src >= 32) return x;
  if (!((act >> src) & 1u)) {
    emu::report("simd_shuffle_down: lane %u reads inactive lane %lld", emu::cur->lane, (long long)src);
    return x;
  }
  return emu::lane_value<T>(s, (uint32_t)src);
}
template <class T>
inline T simd_shuffle_up(T x, ushort delta) {
  int64_t src = (int64_t)emu::cur->lane - delta;
  uint32_t act;
  const char* s = emu::simd_exchange(&x, (int)sizeof(T), emu::OP_SHUFFLE_UP, &act);
  if (src < 0) return x;
  if (!((act >> src) & 1u)) {
    emu::report("simd_shuffle_up: lane %u reads inactive lane %lld", emu::cur->lane, (long long)src);
    return x;
  }
  return emu::lane_value<T>(s, (uint32_t)src);
}

inline void threadgroup_barrier(mem_flags) { emu::barrier(0); }
inline void simdgroup_barrier(mem_flags) { emu::barrier(1); }

// ---- simdgroup_matrix<T, 8, 8> ----
template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "only 8x8 simdgroup matrices are emulated");
  vec<T, 2> e;
  // Metal leaves a fresh matrix undefined; NaN makes any use of unset elements visible
  simdgroup_matrix() : e(T(__builtin_nanf("")), T(__builtin_nanf(""))) {}
  vec<T, 2>& thread_elements() { return e; }
  const vec<T, 2>& thread_elements() const { return e; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int C, int R>
inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, C, R> m;
  m.e = vec<T, 2>(v, v);
  return m;
}

// D = A * B + C; a collective of all 32 lanes, each holding its elements in Apple's layout
template <class T>
inline void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, 8, 8>& D, const thread simdgroup_matrix<T, 8, 8>& A,
                                          const thread simdgroup_matrix<T, 8, 8>& B,
                                          const thread simdgroup_matrix<T, 8, 8>& C) {
  float mine[6] = {(float)A.e.x, (float)A.e.y, (float)B.e.x, (float)B.e.y, (float)C.e.x, (float)C.e.y};
  uint32_t act;
  const char* s = emu::simd_exchange(mine, (int)sizeof mine, emu::OP_MMA, &act);
  if (act != 0xffffffffu) {
    emu::report("simdgroup_multiply_accumulate with active lanes %08x in simdgroup %u: all 32 lanes must take part", act,
                emu::cur->sg);
  }
  float a[8][8], b[8][8], c[8][8];
  for (uint32_t l = 0; l < 32; ++l) {
    float v[6];
    __builtin_memcpy(v, s + 64 * l, sizeof v);
    int r, col;
    emu::lane_coord(l, r, col);
    a[r][col] = v[0]; a[r][col + 1] = v[1];
    b[r][col] = v[2]; b[r][col + 1] = v[3];
    c[r][col] = v[4]; c[r][col + 1] = v[5];
  }
  int r, col;
  emu::lane_coord(emu::cur->lane, r, col);
  for (int j = 0; j < 2; ++j) {
    float acc = 0.0f;
    for (int k = 0; k < 8; ++k) acc += a[r][k] * b[k][col + j];
    D.e[j] = (T)(acc + c[r][col + j]);
  }
}
template <class T>
inline void simdgroup_multiply(thread simdgroup_matrix<T, 8, 8>& D, const thread simdgroup_matrix<T, 8, 8>& A,
                               const thread simdgroup_matrix<T, 8, 8>& B) {
  simdgroup_matrix<T, 8, 8> Z = make_filled_simdgroup_matrix<T, 8, 8>(T(0));
  simdgroup_multiply_accumulate(D, A, B, Z);
}

// simdgroup_load/store: element (r, c) of the matrix is src[(origin.y + r) * elements_per_row + origin.x + c],
// or src[(origin.y + c) * elements_per_row + origin.x + r] when transposed.
template <class T, class P>
inline void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, P src, ulong elements_per_row = 8,
                           ulong2 origin = ulong2(0, 0), bool transpose = false) {
  int r, c;
  emu::lane_coord(emu::cur->lane, r, c);
  for (int j = 0; j < 2; ++j) {
    int64_t rr = transpose ? c + j : r, cc = transpose ? r : c + j;
    d.e[j] = (T)(float)src[(int64_t)(origin.y + rr) * (int64_t)elements_per_row + (int64_t)origin.x + cc];
  }
}
template <class T, class P>
inline void simdgroup_store(const thread simdgroup_matrix<T, 8, 8>& m, P dst, ulong elements_per_row = 8,
                            ulong2 origin = ulong2(0, 0), bool transpose = false) {
  int r, c;
  emu::lane_coord(emu::cur->lane, r, c);
  for (int j = 0; j < 2; ++j) {
    int64_t rr = transpose ? c + j : r, cc = transpose ? r : c + j;
    dst[(int64_t)(origin.y + rr) * (int64_t)elements_per_row + (int64_t)origin.x + cc] = m.e[j];
  }
}
}  // namespace metal

#endif
