#!/usr/bin/env python3
"""Warpgroup MMA (``wgmma.mma_async``, sm_90a) inside ``mx.fast.cuda_kernel``: which shared-memory
layouts and descriptor encodings give the right product, before a forward kernel is built on them.

One warpgroup (128 threads) computes a 64 x 64 x 16 float16 product with float32 accumulators, the two
shapes an attention forward needs:

- ``S = Q K^T`` (A = Q [64 rows, 16 k] and B = K [64 keys, 16 k], both K-major in shared memory);
- ``O = P V`` (A = P from registers in mma.sync's A-fragment layout, B = V [16 keys, 64 columns],
  N-major in shared memory, read through the descriptor's transpose bit).

Shared memory holds the operands as no-swizzle "core matrices" (8 rows of 16 contiguous bytes, 128
bytes each); the descriptor's two byte offsets (LBO, SBO) give the distances between core matrices
along the leading and the strided dimension. The PTX ISA's wording of which is which differs between
K-major and MN-major operands, so each case is run under both assignments (and the transposed layout
of V under both); the script prints every variant's largest error against NumPy. Expect exactly one
variant of each case near 1e-3 and the others wrong. A fifth variant computes S over 64 features in the
128-byte swizzled layout a fast kernel would use (one 128-byte row per token, descriptor advanced per k step).

    source .device/setup.sh && python3 benchmarks/gpu/wgmma_probe.py

On the lent H200 (MLX 0.32.4, 2026-12-02), max |err| against NumPy: ``qk lbo=K sbo=R`` 1.2e-6 (right),
``qk lbo=R sbo=K`` 23.7 (wrong), ``pv lbo=N sbo=K`` illegal memory access (it reads 8 x 1024 bytes along n),
``pv lbo=K sbo=N`` 9.5e-7 (right), ``qk sw128 d64`` 4.7e-6 (right). So without swizzle LBO is the distance
between core matrices along k and SBO along the rows (K-major) or the columns (N-major, transpose bit
set), as CUTLASS's GMMA descriptor comments have it; A from registers takes mma.sync's A fragments.

``--emit DIR`` writes each variant as a .cu file (with a stand-in signature) for
``nvcc -arch=sm_90a -c`` here, without a GPU.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

# element (r, k) of a K-major 64 x 16 operand -> byte offset: core matrix (r / 8, k / 8), then 16 bytes
# per row and 2 per element inside it. Core matrices adjacent along k are STEP_K bytes apart, along r STEP_R.
STEP_K, STEP_R = 128, 256
# V [16 keys, 64 columns], N-major: core matrix (n / 8, k / 8) holds 8 keys (rows) of 8 contiguous columns.
V_STEP_N, V_STEP_K = 128, 1024

COMMON = r"""
  __shared__ __align__(128) unsigned short sa[64 * 16];
  __shared__ __align__(128) unsigned short sb[64 * 16];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned short* ga = reinterpret_cast<const unsigned short*>(a);
  const unsigned short* gb = reinterpret_cast<const unsigned short*>(b);
"""

DESC = r"""
  auto desc = [](const void* p, unsigned lbo, unsigned sbo) -> unsigned long long {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    return (unsigned long long)((addr >> 4) & 0x3FFF) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32);  // base offset 0, no swizzle (bits 62-63 = 0)
  };
"""

def _wgmma(a_operand: str, inputs: str, trans: str) -> str:
    """One m64n64k16 wgmma (float16 in, float32 accumulators d[32], added to: scale-d true) between the
    fence and the wait. ``a_operand``: the A operand and the immediates after scale-d, as PTX text."""
    dregs = ", ".join(f"%{i}" for i in range(32))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(32))
    return f"""
  asm volatile("wgmma.fence.sync.aligned;\\n" ::: "memory");
  asm volatile(
      "{{\\n.reg .pred p;\\nsetp.ne.b32 p, 1, 0;\\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {{{dregs}}}, {a_operand}, {trans};\\n"
      "}}\\n"
      : {outs}
      : {inputs});
  asm volatile("wgmma.commit_group.sync.aligned;\\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\\n" ::: "memory");
"""


# A and B from shared memory (descriptors da, db): imm-scale-a 1, imm-scale-b 1, imm-trans-a 0, imm-trans-b
WGMMA_SS = _wgmma("%32, %33, p, 1, 1, 0", '"l"(da), "l"(db)', "TRANSB")
# A from registers (af[4], mma.sync's A fragment of the warp's 16 rows), B by descriptor db
WGMMA_RS = _wgmma("{%32, %33, %34, %35}, %36, p, 1, 1", '"r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "l"(db)', "TRANSB")

# the accumulators: warp w holds rows 16 w + lane / 4 (+ 8), columns 8 j + 2 (lane % 4) (+ 1), as mma.sync's
STORE = r"""
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + lane / 4 + 8 * (e >> 1), col = 8 * j + 2 * (lane % 4) + (e & 1);
      out[row * 64 + col] = d[4 * j + e];
    }
"""


def qk_body(lbo: int, sbo: int) -> str:
    """S = A B^T, A = a [64, 16] and B = b [64, 16] (row-major, K contiguous), both K-major."""
    return COMMON + DESC + f"""
  for (int i = tid; i < 64 * 16; i += 128) {{
    const int r = i / 16, k = i % 16;
    const int off = ((r / 8) * {STEP_R} + (k / 8) * {STEP_K} + (r % 8) * 16 + (k % 8) * 2) / 2;
    sa[off] = ga[i];
    sb[off] = gb[i];
  }}
  asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");
  __syncthreads();
  const unsigned long long da = desc(sa, {lbo}, {sbo}), db = desc(sb, {lbo}, {sbo});
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
""" + WGMMA_SS.replace("TRANSB", "0") + STORE


def pv_body(lbo: int, sbo: int) -> str:
    """O = P V: P = a [64, 16] from registers (mma.sync m16n8k16's A fragments of warp w's 16 rows),
    V = b [16, 64] (row-major: N contiguous), N-major in shared memory, transpose bit set."""
    return COMMON + DESC + f"""
  for (int i = tid; i < 16 * 64; i += 128) {{
    const int k = i / 64, n = i % 64;
    const int off = ((n / 8) * {V_STEP_N} + (k / 8) * {V_STEP_K} + (k % 8) * 16 + (n % 8) * 2) / 2;
    sb[off] = gb[i];
  }}
  asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");
  __syncthreads();
  // A fragment: {{(r, c), (r, c + 1)}}, {{(r + 8, c), ...}}, {{(r, c + 8), ...}}, {{(r + 8, c + 8), ...}},
  // r = 16 w + lane / 4, c = 2 (lane % 4)
  unsigned af[4];
  {{
    const int r = 16 * warp + lane / 4, c = 2 * (lane % 4);
    const int rr[4] = {{r, r + 8, r, r + 8}}, cc[4] = {{c, c, c + 8, c + 8}};
    for (int q = 0; q < 4; ++q)
      af[q] = (unsigned)ga[rr[q] * 16 + cc[q]] | ((unsigned)ga[rr[q] * 16 + cc[q] + 1] << 16);
  }}
  const unsigned long long db = desc(sb, {lbo}, {sbo});
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
""" + WGMMA_RS.replace("TRANSB", "1") + STORE


def qk_sw128_body(sbo: int) -> str:
    """S = A B^T over 64 features (4 k steps): A = a [64, 64], B = b [64, 64], K-major with the 128-byte
    swizzle (the layout of a fast kernel: one 128-byte row per token, its eight 16-byte chunks permuted by
    the row's index mod 8: chunk c of row r at (c ^ r % 8); 8-row atoms of 1024 bytes, SBO apart). The
    descriptor's start advances 32 bytes per k step; LBO is unused with this swizzle (16 by convention)."""
    return r"""
  __shared__ __align__(1024) unsigned short sa[64 * 64];
  __shared__ __align__(1024) unsigned short sb[64 * 64];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned short* ga = reinterpret_cast<const unsigned short*>(a);
  const unsigned short* gb = reinterpret_cast<const unsigned short*>(b);
""" + DESC + f"""
  auto desc_sw = [&](const void* p) -> unsigned long long {{ return desc(p, 16, {sbo}) | (1ull << 62); }};
  for (int i = tid; i < 64 * 64; i += 128) {{
    const int r = i / 64, k = i % 64;
    const int off = ((r / 8) * 1024 + (r % 8) * 128 + (((k / 8) ^ (r % 8)) * 16) + (k % 8) * 2) / 2;
    sa[off] = ga[i];
    sb[off] = gb[i];
  }}
  asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");
  __syncthreads();
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  for (int kk = 0; kk < 4; ++kk) {{
    const unsigned long long da = desc_sw(reinterpret_cast<const char*>(sa) + 32 * kk);
    const unsigned long long db = desc_sw(reinterpret_cast<const char*>(sb) + 32 * kk);
""" + WGMMA_SS.replace("TRANSB", "0") + "  }\n" + STORE


VARIANTS = {
    # name: (body, what it tests, A's shape, B's shape, "abT" or "ab")
    "qk lbo=K sbo=R": (qk_body(STEP_K, STEP_R), "S = Q K^T, LBO = distance along k", (64, 16), (64, 16), "abT"),
    "qk lbo=R sbo=K": (qk_body(STEP_R, STEP_K), "S = Q K^T, LBO = distance along rows", (64, 16), (64, 16), "abT"),
    "pv lbo=N sbo=K": (pv_body(V_STEP_N, V_STEP_K), "O = P V (P in registers), LBO = distance along n", (64, 16), (16, 64), "ab"),
    "pv lbo=K sbo=N": (pv_body(V_STEP_K, V_STEP_N), "O = P V (P in registers), LBO = distance along k", (64, 16), (16, 64), "ab"),
    "qk sw128 d64": (qk_sw128_body(1024), "S = Q K^T over 64 features, 128-byte swizzle, SBO 1024", (64, 64), (64, 64), "abT"),
}


def emit(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for i, (name, (body, *_)) in enumerate(VARIANTS.items()):
        src = ("#include <cuda_fp16.h>\n#include <cstdint>\n"
               f"extern \"C\" __global__ void probe{i}(const __half* a, const __half* b, float* out) {{\n"
               + body + "\n}\n")
        with open(os.path.join(folder, f"probe{i}.cu"), "w") as f:
            f.write(src)
        print(folder, f"probe{i}.cu", name)


def run(only: int | None = None) -> None:
    """Each variant in a process of its own (``--only i``): a wrong encoding can fault, and a fault poisons
    the CUDA context for every later launch of its process."""
    if only is None:
        import subprocess
        import sys

        for i in range(len(VARIANTS)):
            subprocess.run([sys.executable, os.path.abspath(__file__), "--only", str(i)], check=False)
        return
    import mlx.core as mx

    rng = np.random.default_rng(0)
    for i, (name, (body, what, a_shape, b_shape, op)) in enumerate(VARIANTS.items()):
        if i != only:
            continue
        a = rng.standard_normal(a_shape).astype(np.float16)
        b = rng.standard_normal(b_shape).astype(np.float16)
        b64 = b.astype(np.float64)
        ref = a.astype(np.float64) @ (b64.T if op == "abT" else b64)
        k = mx.fast.cuda_kernel(name=f"natten_wgmma_probe{i}", input_names=["a", "b"], output_names=["out"], source=body)
        try:
            (o,) = k(inputs=[mx.array(a), mx.array(b)], grid=(128, 1, 1), threadgroup=(128, 1, 1),
                     output_shapes=[(64, 64)], output_dtypes=[mx.float32], init_value=float("nan"))
            err = float(np.nanmax(np.abs(np.array(o) - ref))) if np.isfinite(np.array(o)).all() else float("nan")
            print(f"{name:16s} max |err| {err:.3e}   ({what})", flush=True)
        except Exception as exc:  # a wrong encoding may fault
            print(f"{name:16s} error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--emit", help="write the variants as .cu files into this folder and stop")
    ap.add_argument("--only", type=int, default=None, help="run this variant alone (in this process)")
    args = ap.parse_args()
    emit(args.emit) if args.emit else run(args.only)
