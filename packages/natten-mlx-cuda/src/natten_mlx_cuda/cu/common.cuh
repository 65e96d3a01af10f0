// natten_mlx_cuda/kernels/common.cuh: what every natten-mlx CUDA kernel body shares. The Python
// side prepends NA_FUNC's definition, window.h and tiling.h, then this file, as the header= of
// mx.fast.cuda_kernel. Under NA_EMU (the CPU emulator of tests/cuda) the emulator's prelude
// provides the CUDA built-ins used here (types, conversions, warp shuffles, the mma and cp.async).
#ifndef NATTEN_MLX_CUDA_COMMON
#define NATTEN_MLX_CUDA_COMMON

#define NA_NEG_INF (-__int_as_float(0x7f800000))
#define NA_LN2 0.6931471805599453f
#define NA_LOG2E 1.4426950408889634f

// The int parameter block (prm input): 8 scalars, then 10 per spatial axis. Problems of rank < 3
// are padded in front with trivial axes (L = n = nk = K = s = d = 1), so every kernel walks 3 axes.
#define NA_P_B 0
#define NA_P_H 1
#define NA_P_HKV 2
#define NA_P_N 3
#define NA_P_NK 4
#define NA_P_D 5
#define NA_P_DV 6
#define NA_P_RPB 7  // rpb entries per head: prod(2K - 1)

// fmha_fwd's shared tables after Q, K and V: 3 x 65 column masks (64-bit), the block geometry
// (NA_FWD_GEO ints), 8 ints per query row, 5 ints per key tile of a chunk of MAXT tiles, one int per
// key-tile row (plan.py sizes the shared memory)
#define NA_FWD_GEO 36
#define NA_FWD_SHORT (1 << 26)  // a listed key tile's meta bit: some extent is shorter than the tile

struct NaAxis {
  int L;      // global axis length (the domain the window rules apply to)
  int n;      // local query extent
  int nk;     // local key/value extent
  int qoff;   // global index of local query 0
  int kvoff;  // global index of local key 0
  int K, s, d;
  bool causal;
  int qtiles;  // query tiles per dilation group (na_query_tiles) for the kernel's tile size
};

NA_FUNC NaAxis na_axis(const int* prm, int a) {
  const int* p = prm + 8 + 10 * a;
  NaAxis x;
  x.L = p[0]; x.n = p[1]; x.nk = p[2]; x.qoff = p[3]; x.kvoff = p[4];
  x.K = p[5]; x.s = p[6]; x.d = p[7]; x.causal = p[8] != 0; x.qtiles = p[9];
  return x;
}

template <typename T> struct NaType;
template <> struct NaType<float> {
  static NA_FUNC float to_float(float x) { return x; }
  static NA_FUNC float from_float(float x) { return x; }
  // p[0], p[1] = lo, hi (the 16-bit types: one 32-bit store; p 4-byte aligned)
  static NA_FUNC void store2(float* p, float lo, float hi) {
    p[0] = lo;
    p[1] = hi;
  }
};
template <> struct NaType<__half> {
  static NA_FUNC float to_float(__half x) { return __half2float(x); }
  static NA_FUNC __half from_float(float x) { return __float2half_rn(x); }
  // two floats as one register of packed halves, the lower index in the low 16 bits
  static NA_FUNC unsigned pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  static NA_FUNC void store2(__half* p, float lo, float hi) { *reinterpret_cast<unsigned*>(p) = pack2(lo, hi); }
};
template <> struct NaType<__nv_bfloat16> {
  static NA_FUNC float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static NA_FUNC __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static NA_FUNC unsigned pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  static NA_FUNC void store2(__nv_bfloat16* p, float lo, float hi) { *reinterpret_cast<unsigned*>(p) = pack2(lo, hi); }
};

template <typename T> NA_FUNC float na_f(T x) { return NaType<T>::to_float(x); }

#ifndef NA_EMU
// D[16x8] += A[16x16] * B[16x8] on the tensor cores, float accumulators. Fragment layout (PTX ISA,
// mma.m16n8k16): gid = lane / 4, tig = lane % 4; a[0]: A[gid][2tig..+1], a[1]: A[gid+8][2tig..+1],
// a[2]: A[gid][2tig+8..+9], a[3]: A[gid+8][2tig+8..+9]; b[0]: B[2tig..+1][gid], b[1]: B[2tig+8..+9][gid];
// c[0..1]: C[gid][2tig..+1], c[2..3]: C[gid+8][2tig..+1]. Not volatile: a pure function of its
// operands, so the compiler may schedule it among the loads.
template <typename T> NA_FUNC void na_mma(float* c, const unsigned* a, const unsigned* b);
template <> NA_FUNC void na_mma<__half>(float* c, const unsigned* a, const unsigned* b) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> NA_FUNC void na_mma<__nv_bfloat16>(float* c, const unsigned* a, const unsigned* b) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 2^x on the SFU alone (ex2.approx.ftz: relative error ~2^-22, subnormal results flushed to zero; 2^-inf
// = 0). exp2f without fast-math wraps the same instruction in a range check and two multiplies, which
// the softmax of every key tile pays 32 times per thread.
NA_FUNC float na_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16 bytes global -> shared without registers; valid == false fills the 16 bytes with zeros.
NA_FUNC void na_cp_async16(void* smem, const void* gmem, bool valid) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
NA_FUNC void na_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
NA_FUNC void na_cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
NA_FUNC void na_cp_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
// every committed group but the newest N is complete
template <int N> NA_FUNC void na_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
// Four 8x8 b16 matrices from shared memory: lane l gives the address of row l % 8 of matrix l / 8
// (16 contiguous bytes). Without .trans lane l receives in r[i] matrix i's row l / 4, columns
// 2 (l % 4) and +1: a B fragment of mma when the rows are B's columns (K in Q K^T). With .trans it
// receives rows 2 (l % 4), +1 of column l / 4: a B fragment when the rows are B's rows (V in P V).
NA_FUNC void na_ldsm_x4(unsigned* r, const void* row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
NA_FUNC void na_ldsm_x4_t(unsigned* r, const void* row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
#define NA_SHARED_DECL extern __shared__ __align__(16) unsigned char na_smem[]
#endif

// B fragments of two adjacent n-subtiles (8 columns each) from a row-major shared tile whose rows
// are B's columns (n) and columns B's k: rows n0 .. n0 + 15, columns k0 .. k0 + 15.
// b[0], b[1]: subtile n0; b[2], b[3]: subtile n0 + 8. stride in elements. LDSM: through ldmatrix,
// else through 32-bit shared loads (the A/B switch of the benchmark).
template <bool LDSM>
NA_FUNC void na_frag_b_nk(unsigned* b, const unsigned short* base, int stride, int n0, int k0, int lane) {
  if (LDSM) {
    const int m = lane >> 3, r = lane & 7;
    na_ldsm_x4(b, base + (n0 + (m >> 1) * 8 + r) * stride + k0 + (m & 1) * 8);
  } else {
    const unsigned short* p = base + (n0 + (lane >> 2)) * stride + k0 + (lane & 3) * 2;
    b[0] = *reinterpret_cast<const unsigned*>(p);
    b[1] = *reinterpret_cast<const unsigned*>(p + 8);
    b[2] = *reinterpret_cast<const unsigned*>(p + 8 * stride);
    b[3] = *reinterpret_cast<const unsigned*>(p + 8 * stride + 8);
  }
}
// The A fragment (16 x 16) at rows row0 .. row0 + 15, columns k0 .. k0 + 15 of a row-major shared tile.
template <bool LDSM>
NA_FUNC void na_frag_a(unsigned* a, const unsigned short* base, int stride, int row0, int k0, int lane) {
  if (LDSM) {
    const int m = lane >> 3, r = lane & 7;
    na_ldsm_x4(a, base + (row0 + (m & 1) * 8 + r) * stride + k0 + (m >> 1) * 8);
  } else {
    const unsigned short* p = base + (row0 + (lane >> 2)) * stride + k0 + (lane & 3) * 2;
    a[0] = *reinterpret_cast<const unsigned*>(p);
    a[1] = *reinterpret_cast<const unsigned*>(p + 8 * stride);
    a[2] = *reinterpret_cast<const unsigned*>(p + 8);
    a[3] = *reinterpret_cast<const unsigned*>(p + 8 * stride + 8);
  }
}
// The same from a tile whose rows are B's k and columns B's n (k0 .. k0 + 15, n0 .. n0 + 15).
template <bool LDSM>
NA_FUNC void na_frag_b_kn(unsigned* b, const unsigned short* base, int stride, int k0, int n0, int lane) {
  if (LDSM) {
    const int m = lane >> 3, r = lane & 7;
    na_ldsm_x4_t(b, base + (k0 + (m & 1) * 8 + r) * stride + n0 + (m >> 1) * 8);
  } else {
    const unsigned short* p = base + (k0 + (lane & 3) * 2) * stride + n0 + (lane >> 2);
    for (int i = 0; i < 4; ++i) {
      const unsigned short* q = p + (i & 1) * 8 * stride + (i >> 1) * 8;
      b[i] = (unsigned)q[0] | ((unsigned)q[stride] << 16);
    }
  }
}

// Tiles for wgmma live in shared memory in the 128-byte swizzle: a tile of R rows (R a multiple of 8)
// and C 16-bit columns (C a multiple of 64) is C / 64 panels of R rows x 128 bytes; the 16-byte chunk c
// (columns 8 c .. 8 c + 7 of the panel) of row r sits at chunk c ^ (r % 8) of its row; panels and tiles
// start 1024-byte aligned. na_sw_off gives the element offset of (row r, 16-byte chunk ch of the whole
// row) in such a tile.
template <int R>
NA_FUNC int na_sw_off(int r, int ch) { return (ch >> 3) * R * 64 + r * 64 + (((ch & 7) ^ (r & 7)) << 3); }

// The tile loads of every tensor-core kernel: ROWS rows of CH 16-byte chunks from global rows
// row_t[r] * tok bytes after g into dst (row stride in elements), NT threads, each copying the same
// (row, chunk) pairs of every tile. Bit r of `in` says whether row r is inside the tile (else 16 zero
// bytes, read from the tile's first row). Per chunk: the row's token offset (shared), one wide
// multiply-add for the address (IMAD.WIDE.U32), the row's bit of `in` at a constant shift; FULL (a
// tile inside the range on every axis: in is all ones) drops the row checks. SWZ: dst is a swizzled
// tile of ROWS rows (na_sw_off; stride unused). With NT a multiple of
// CH a thread's rows are tid / CH + m NT / CH: shared and global offsets fold into immediates (SASS
// of the forward before: ~15 instructions per K/V chunk pair, rows kept in registers per step).
template <int ROWS, int CH, bool FULL = false, int NT = 128, bool SWZ = false, typename T>
NA_FUNC void na_load_rows(int tid, const int* row_t, unsigned long long in, const T* g, unsigned tok, T* dst,
                          int stride) {
  constexpr bool FOLD = NT % CH == 0;
  const unsigned ut = (unsigned)tid;
  const char* gb = reinterpret_cast<const char*>(g) + (FOLD ? ut % CH * 16 : 0);
  const unsigned long long inr = FOLD ? in >> (ut / CH) : in;
#pragma unroll
  for (int m = 0; m < (ROWS * CH + NT - 1) / NT; ++m) {
    const unsigned i = ut + NT * m;
    const unsigned r = FOLD ? ut / CH + m * (NT / CH) : i / CH;
    const unsigned ch = FOLD ? ut % CH : i % CH;
    if (ROWS * CH % NT == 0 || i < (unsigned)(ROWS * CH)) {
      const bool ok = FULL || ((unsigned)(inr >> (FOLD ? m * (NT / CH) : r)) & 1u) != 0u;
      const unsigned long long off = (unsigned long long)(unsigned)(ok ? row_t[r] : 0) * tok;
      na_cp_async16(dst + (SWZ ? na_sw_off<ROWS>((int)r, (int)ch) : (int)(r * stride + ch * 8)), gb + off + (FOLD ? 0 : ch * 16), ok);
    }
  }
}

// ---- warpgroup MMA (sm_90a wgmma; fmha_fwd's WG) ----
// Tiles for wgmma: see na_sw_off (above na_load_rows).
#ifndef NA_EMU
// wgmma needs the arch-specific target (MLX asks NVRTC for sm_90a on compute capability 9.0); elsewhere
// the WG bodies trap, and plan.py never launches them (plan.wgmma_reason)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NA_HAVE_WGMMA 1
#endif
NA_FUNC unsigned na_smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
// A matrix descriptor: start address, LBO and SBO in 16-byte units, base offset 0, 128-byte swizzle
NA_FUNC unsigned long long na_wg_desc(const void* p, unsigned lbo, unsigned sbo) {
  const unsigned addr = na_smem_addr(p);
  return (unsigned long long)((addr >> 4) & 0x3FFF) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
         ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
#ifdef NA_HAVE_WGMMA
NA_FUNC void na_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
NA_FUNC void na_wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> NA_FUNC void na_wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// generic-proxy writes (cp.async, stores) made visible to the async proxy that wgmma reads through
NA_FUNC void na_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#else
NA_FUNC void na_wg_fence() { __trap(); }
NA_FUNC void na_wg_commit() { __trap(); }
template <int N> NA_FUNC void na_wg_wait() { __trap(); }
NA_FUNC void na_fence_proxy_async() { __trap(); }
#endif
// keeps the compiler from moving a register's reads or writes across a wgmma issue or wait
NA_FUNC void na_wg_pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
// D[64 x 64] (+)= A[64 x 16] B[64 x 16]^T (acc == 0: D = A B^T), float accumulators: the 64 rows of
// the warpgroup (warp w % 4: rows 16 (w % 4) + lane / 4 (+ 8), columns 8 j + 2 (lane % 4) (+ 1) in
// d[4 j + e], as mma.sync's fragments). A and B K-major in swizzled tiles: a and b point at the k
// step's first column of row 0 (a panel's start + 32 bytes per k step); 8-row groups 1024 bytes apart.
template <typename T> NA_FUNC void na_wg_ss(float* d, const void* a, const void* b, int acc);
// D[64 x 64] (+)= A[64 x 16] B[16 x 64]: A from registers (mma.sync's A fragments of the warp's 16
// rows), B MN-major in a swizzled tile (one 128-byte row per k: the k step's 16 rows of a V panel); b
// points at the k step's first row, 8-row groups 1024 bytes apart.
template <typename T> NA_FUNC void na_wg_rs(float* d, const unsigned* a, const void* b, int acc);
// the four products (A from shared memory or registers, float16 or bfloat16), written once: TY is the
// PTX type of the operands
#ifdef NA_HAVE_WGMMA
#define NA_WG_ACC \
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define NA_WG_SS_BODY(TY) \
  const unsigned long long da = na_wg_desc(a, 16u, 1024u), db = na_wg_desc(b, 16u, 1024u); \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n" \
      : NA_WG_ACC \
      : "l"(da), "l"(db), "r"(acc));
#define NA_WG_RS_BODY(TY) \
  const unsigned long long db = na_wg_desc(b, 1024u, 1024u); \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n" \
      : NA_WG_ACC \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
#else
#define NA_WG_SS_BODY(TY) __trap();
#define NA_WG_RS_BODY(TY) __trap();
#endif
template <> NA_FUNC void na_wg_ss<__half>(float* d, const void* a, const void* b, int acc) { NA_WG_SS_BODY("f16") }
template <> NA_FUNC void na_wg_ss<__nv_bfloat16>(float* d, const void* a, const void* b, int acc) { NA_WG_SS_BODY("bf16") }
template <> NA_FUNC void na_wg_rs<__half>(float* d, const unsigned* a, const void* b, int acc) { NA_WG_RS_BODY("f16") }
template <> NA_FUNC void na_wg_rs<__nv_bfloat16>(float* d, const unsigned* a, const void* b, int acc) { NA_WG_RS_BODY("bf16") }
#endif

#endif  // NATTEN_MLX_CUDA_COMMON
