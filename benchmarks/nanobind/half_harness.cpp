// The kernel tables' float16 / bfloat16 row conversions (kt.h2f, b2f, f2h, f2b from kernels.o, compiled as
// the wheel compiles it) against MLX's own conversions (static_cast through mx::float16_t / bfloat16_t, what
// the C++ boundary used before and what astype computes on these CPUs), exhaustively: every one of the 2^32
// float32 bit patterns to float16 and bfloat16, every 2^16 pattern back to float32, bit for bit (NaN as
// NaN: MLX's float16 -> float32 keeps a NaN's payload, as vcvtph2ps does). Prints the mismatches per
// table (0 expected) and the rate. Not built by the package; from the repository root (the three kernels.o
// as for fwd2_harness.cpp; MLX's headers from the installed wheel):
//
//   MLXI=$(python -c "import mlx.core as m, os; print(os.path.dirname(m.__file__))")/include
//   g++ $F -I$MLXI -mavx2 -mfma benchmarks/nanobind/half_harness.cpp /tmp/k512.o /tmp/k2.o /tmp/kb.o -o /tmp/hh
//   /tmp/hh
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "mlx/types/half_types.h"
namespace na {
bool perm_al = false;
}
namespace mx = mlx::core;
using namespace na;

template <class T>
uint16_t mlx_bits(float x) {
  T h = static_cast<T>(x);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
template <class T>
float mlx_float(uint16_t b) {
  T h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}

int check(const char* name, const KernelTable& kt) {
  if (!kt.f2h) {
    std::printf("%s: no conversions (the boundary uses MLX's types)\n", name);
    return 0;
  }
  constexpr int64_t kChunk = 1 << 20;
  std::vector<float> src(kChunk);
  std::vector<uint16_t> h(kChunk), b(kChunk);
  int64_t bad_h = 0, bad_b = 0;
  double secs = 0;
  for (uint64_t base = 0; base < (1ull << 32); base += kChunk) {
    for (int64_t i = 0; i < kChunk; ++i) {
      const uint32_t u = static_cast<uint32_t>(base + i);
      std::memcpy(&src[i], &u, 4);
    }
    // odd lengths reach the 8-value tails too
    const int64_t n = kChunk - (base >> 20) % 8;
    auto t0 = std::chrono::steady_clock::now();
    kt.f2h(src.data(), h.data(), n);
    kt.f2b(src.data(), b.data(), n);
    secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int64_t i = 0; i < n; ++i) {
      bad_h += h[i] != mlx_bits<mx::float16_t>(src[i]);
      bad_b += b[i] != mlx_bits<mx::bfloat16_t>(src[i]);
    }
  }
  std::vector<uint16_t> all(65536);
  std::vector<float> fh(65536), fb(65536);
  for (int i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  kt.h2f(all.data(), fh.data(), 65536 - 3);
  kt.b2f(all.data(), fb.data(), 65536 - 3);
  kt.h2f(all.data() + 65533, fh.data() + 65533, 3);
  kt.b2f(all.data() + 65533, fb.data() + 65533, 3);
  int64_t bad_hf = 0, bad_bf = 0;
  auto same = [](float a, float c) { return std::isnan(a) ? std::isnan(c) : std::memcmp(&a, &c, 4) == 0; };
  for (int i = 0; i < 65536; ++i) {
    bad_hf += !same(fh[i], mlx_float<mx::float16_t>(all[i]));
    bad_bf += !same(fb[i], mlx_float<mx::bfloat16_t>(all[i]));
  }
  std::printf("%s: float32->float16 %lld, ->bfloat16 %lld mismatches of 2^32; float16->float32 %lld, "
              "bfloat16->float32 %lld of 2^16; %.2f ns per float32 value (both directions out)\n",
              name, static_cast<long long>(bad_h), static_cast<long long>(bad_b), static_cast<long long>(bad_hf),
              static_cast<long long>(bad_bf), secs * 1e9 / 4294967296.0);
  return bad_h || bad_b || bad_hf || bad_bf;
}

int main() {
  int bad = check("avx512", *kernels_avx512());
  bad |= check("avx2", *kernels_avx2());
  bad |= check("base", *kernels_base());
  return bad;
}
