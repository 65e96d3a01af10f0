#!/usr/bin/env python3
# ruff: noqa: B023  (the timed closures are called within the loop iteration that defines them)
"""A warpgroup-MMA attention forward (sm_90a ``wgmma``) through ``mx.fast.cuda_kernel``, standalone:
does the FlashAttention-3 route reach a higher dense rate than the tier's mma.sync kernels (session 7:
318 TFLOP/s on D1 against 610 for MLX's SDPA), before any of it goes into fmha_fwd?

float16, head dim 128, batch 1, layout [tokens, heads, 128] (natten-mlx's heads-last rows). One block
per (128-query tile, head) by default: NWG consumer warpgroups of 64 query rows each, all sharing the
block's K/V tiles; no producer warp (every thread issues cp.async). Shared memory in the 128-byte
swizzle (chunk c of a 128-byte row r at c ^ (r % 8); 8-row atoms of 1024 bytes; a 256-byte token row
in two 64-feature panels):

- S = Q K^T: wgmma m64n{BN}k16, both operands K-major from shared memory (descriptors; SBO 1024, the
  start advanced 32 bytes per k step inside a panel), 8 k steps;
- online softmax in registers (the accumulator of warp w holds rows 16 w + lane / 4 (+ 8), columns
  8 j + 2 (lane % 4) (+ 1), as mma.sync's);
- O += P V: wgmma m64n64k16 per 64-feature panel, P from registers (mma.sync's A fragments), V
  MN-major from shared memory (transpose bit; 128-byte swizzle: LBO between 64-feature panels, SBO
  1024 between 8-key groups, as CUTLASS's canonical layouts have it);
- K/V tiles double-buffered by cp.async (tile t + 1 in flight during tile t).

WIN > 0 computes 1D neighborhood attention instead (stride 1, no dilation, not causal: window start
clamp(i - K // 2, 0, N - K), SEMANTICS.md): a query tile walks only the key tiles its windows touch and
masks elements only on tiles that straddle a window border (G1: 32768 tokens, window 2048).

    source .device/setup.sh && python3 benchmarks/gpu/wgmma_attn.py            # checks, then timings
    python3 benchmarks/gpu/wgmma_attn.py --emit /tmp/wg                        # .cu files for nvcc -arch=sm_90a

Each configuration runs in a child process (a fault poisons the CUDA context of its process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cuda import timed  # noqa: E402  (the tier benchmark's timing: median of 5 groups of queued calls)

TAG = "@@ROW "


def _wgmma(n: int, a_regs: bool, dname: str, d0: int) -> str:
    """One wgmma.mma_async m64n{n}k16 f32 += f16 x f16 as an asm statement; accumulators dname[d0 ..
    d0 + n / 2). A from shared (descriptor da) or registers (a[0..3]), B by descriptor db; the predicate
    operand `acc` (int, nonzero: D += A B, zero: D = A B)."""
    nd = n // 2
    dregs = ", ".join(f"%{i}" for i in range(nd))
    outs = ", ".join(f'"+f"({dname}[{d0 + i}])' for i in range(nd))
    if a_regs:
        a = f"{{%{nd}, %{nd + 1}, %{nd + 2}, %{nd + 3}}}"
        b, p = f"%{nd + 4}", f"%{nd + 5}"
        tail = "1, 1, 1"  # scale-a, scale-b, transpose-b (V is MN-major)
        ins = '"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc)'
    else:
        a, b, p = f"%{nd}", f"%{nd + 1}", f"%{nd + 2}"
        tail = "1, 1, 0, 0"  # scale-a, scale-b, transpose-a, transpose-b (both K-major)
        ins = '"l"(da), "l"(db), "r"(acc)'
    return (
        f'asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, {p}, 0;\\n"\n'
        f'  "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{dregs}}}, {a}, {b}, p, {tail};\\n}}\\n"\n'
        f"  : {outs}\n  : {ins});\n"
    )


def header(bn: int) -> str:
    return (
        r"""
#define WG_FUNC __device__ __forceinline__
WG_FUNC unsigned long long wg_desc(unsigned addr, unsigned lbo, unsigned sbo) {
  // start address, LBO, SBO (16-byte units), base offset 0, 128-byte swizzle (mode 1 in bits 62-63)
  return (unsigned long long)((addr >> 4) & 0x3FFF) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
         ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
WG_FUNC void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
WG_FUNC void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> WG_FUNC void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
WG_FUNC void wg_pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
WG_FUNC void cp16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
WG_FUNC void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> WG_FUNC void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
// mbarriers (MB): init by one thread, arrivals by every thread, waits on a phase's parity
WG_FUNC void mb_init(unsigned a, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
}
WG_FUNC void mb_arrive(unsigned a) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(a) : "memory");
}
WG_FUNC void mb_arrive_cp(unsigned a) {  // arrives once every cp.async this thread issued so far has landed
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a) : "memory");
}
WG_FUNC void mb_wait(unsigned a, unsigned parity) {
  asm volatile("{\n.reg .pred p;\nMB_WAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra MB_WAIT;\n}\n"
               ::"r"(a), "r"(parity) : "memory");
}
WG_FUNC float wg_exp2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x)); return y; }
WG_FUNC unsigned wg_pack(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
"""
        + "WG_FUNC void wg_s(float* s, unsigned long long da, unsigned long long db, int acc) {\n"
        + _wgmma(bn, False, "s", 0)
        + "}\n"
        + "WG_FUNC void wg_pv(float* o, const unsigned* a, unsigned long long db, int acc) {\n"
        + _wgmma(64, True, "o", 0)
        + "}\n"
    )


BODY = r"""
  // q, k, v: [N, H, 128] float16; prm: {N, H, K (window; 0 dense)}; scl: {scale * log2(e)}
  // out: [N, H, 128] float16; lse: [H, N] float32 (natural log)
  // WS: warpgroup 0 produces (Q and the K/V ring by cp.async onto mbarriers), warpgroups 1..NWG consume;
  // then NT counts the loading threads and wg the consumer index (-1 for the producer)
  constexpr int BM = 64 * NWG, NT = WS ? 128 : 128 * NWG, SN = BN / 2;
  extern __shared__ unsigned char wg_smem_raw[];
  const int N = prm[0], H = prm[1], KW = prm[2];
  const float sl2 = scl[0];
  const int tid = WS ? threadIdx.x & 127 : threadIdx.x, lane = tid & 31, warp = (tid >> 5) & 3;
  const int wg = WS ? (int)(threadIdx.x >> 7) - 1 : (int)(threadIdx.x >> 7);
  const int qt = blockIdx.x, h = blockIdx.y, q0 = qt * BM;
  const unsigned base0 = (unsigned)__cvta_generic_to_shared(wg_smem_raw);
  const unsigned sbase = (base0 + 1023u) & ~1023u;
  const unsigned sQ = sbase, sK0 = sQ + BM * 256, sV0 = sK0 + STAGES * BN * 256;
  const size_t tok = (size_t)H * 128;  // elements between tokens
  const __half* qh = reinterpret_cast<const __half*>(q) + h * 128;
  const __half* kh = reinterpret_cast<const __half*>(k) + h * 128;
  const __half* vh = reinterpret_cast<const __half*>(v) + h * 128;

  // chunk (r, ch) of a tile of ROWS 256-byte rows -> swizzled shared offset
  auto sw = [](int r, int ch, int rows) -> unsigned {
    return (unsigned)((ch >> 3) * rows * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
  };
  // key-tile range of this query tile
  int t0 = 0, t1 = N / BN;
  if (WIN) {
    const int lo = min(max(q0 - KW / 2, 0), N - KW);
    const int hi = min(max(q0 + BM - 1 - KW / 2, 0), N - KW) + KW;
    t0 = lo / BN;
    t1 = (hi + BN - 1) / BN;
  }
  auto load_kv = [&](int t, int st) {
    const unsigned dk = sK0 + st * BN * 256, dv = sV0 + st * BN * 256;
#pragma unroll
    for (int i = tid; i < BN * 16; i += NT) {
      const int r = i >> 4, ch = i & 15;
      const size_t g = (size_t)(t * BN + r) * tok + ch * 8;
      cp16(dk + sw(r, ch, BN), kh + g);
      cp16(dv + sw(r, ch, BN), vh + g);
    }
  };
  if (!WS || wg < 0) {
#pragma unroll
    for (int i = tid; i < BM * 16; i += NT) {
      const int r = i >> 4, ch = i & 15;
      cp16(sQ + sw(r, ch, BM), qh + (size_t)(q0 + r) * tok + ch * 8);
    }
  }
  // MB: per stage a "full" barrier (every thread's copies landed) and an "empty" one (every thread is done
  // with the tile), NT arrivals each; the first STAGES tiles are issued now (Q rides with the first)
  __shared__ __align__(8) unsigned long long mbar[2 * 8];
  const unsigned fullb = (unsigned)__cvta_generic_to_shared(mbar), emptyb = fullb + 8 * 8;
  if (WS) {
    // full[i]: the producer's 128 threads' copies landed; empty[i]: all 128 NWG consumers are done with it
    if (threadIdx.x == 0)
      for (int i = 0; i < STAGES; ++i) {
        mb_init(fullb + 8 * i, 128);
        mb_init(emptyb + 8 * i, 128 * NWG);
      }
    __syncthreads();
    if (wg < 0) {
      for (int t = t0; t < t1; ++t) {
        const int j = t - t0, st = j % STAGES;
        if (j >= STAGES) mb_wait(emptyb + 8 * st, ((j / STAGES) - 1) & 1);
        load_kv(t, st);
        mb_arrive_cp(fullb + 8 * st);  // Q rides with the first tile
      }
      return;
    }
  } else if (MB) {
    if (tid == 0)
      for (int i = 0; i < STAGES; ++i) {
        mb_init(fullb + 8 * i, NT);
        mb_init(emptyb + 8 * i, NT);
      }
    __syncthreads();
    for (int i = 0; i < STAGES; ++i) {
      if (t0 + i < t1) load_kv(t0 + i, i);
      mb_arrive_cp(fullb + 8 * i);
    }
  } else {
    load_kv(t0, 0);
    cp_commit();
  }

  float o[2][32];
#pragma unroll
  for (int p = 0; p < 2; ++p)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[p][i] = 0.f;
  float s[SN];
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  const int r0 = q0 + 64 * wg + 16 * warp + (lane >> 2), r1 = r0 + 8;  // this thread's two query rows
  int ws0 = 0, ws1 = 0;
  if (WIN) {
    ws0 = min(max(r0 - KW / 2, 0), N - KW);
    ws1 = min(max(r1 - KW / 2, 0), N - KW);
  }
  // the block's window bounds: tiles inside [last row's start, first row's end) need no mask
  const int full_lo = WIN ? min(max(q0 + BM - 1 - KW / 2, 0), N - KW) : 0;
  const int full_hi = WIN ? min(max(q0 - KW / 2, 0), N - KW) + KW : N;

  // S = Q K^T of this warpgroup's 64 rows against the K tile at kst (issued and committed, not waited)
  auto issue_s = [&](unsigned kst) {
#pragma unroll
    for (int i = 0; i < SN; ++i) wg_pin(s[i]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const unsigned qa = sQ + (kk >> 2) * BM * 128 + wg * 64 * 128 + (kk & 3) * 32;
      const unsigned ka = kst + (kk >> 2) * BN * 128 + (kk & 3) * 32;
      wg_s(s, wg_desc(qa, 16, 1024), wg_desc(ka, 16, 1024), kk);
    }
    wg_commit();
  };
  // O += P V for the packed P in pa and the V tile at vst (issued and committed, not waited)
  auto issue_pv = [&](const unsigned (*pa)[2], unsigned vst) {
#pragma unroll
    for (int p = 0; p < 2; ++p)
#pragma unroll
      for (int i = 0; i < 32; ++i) wg_pin(o[p][i]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const unsigned a[4] = {pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1]};
#pragma unroll
      for (int p = 0; p < 2; ++p)
        wg_pv(o[p], a, wg_desc(vst + p * BN * 128 + kk * 2048, BN * 128, 1024), 1);
    }
    wg_commit();
  };
  // tile t's scores in s -> P packed into pa (mask on tiles that straddle a window border, online softmax
  // in the log2 domain); m moves to the new maxima; returns the old accumulators' factors and P's row sums
  auto softmax = [&](int t, unsigned (*pa)[2], float& al0, float& al1, float& ps0, float& ps1) {
    const int kb = t * BN;
    const bool masked = WIN && (kb < full_lo || kb + BN > full_hi);
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[4 * j + e] * sl2;
        if (masked) {
          const int key = kb + 8 * j + 2 * (lane & 3) + (e & 1);
          const int w = e < 2 ? ws0 : ws1;
          if (key < w || key >= w + KW) x = -INFINITY;
        }
        s[4 * j + e] = x;
        if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
      }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
    const float b0 = mx0 == -INFINITY ? 0.f : mx0, b1 = mx1 == -INFINITY ? 0.f : mx1;
    al0 = wg_exp2(m0 - b0);
    al1 = wg_exp2(m1 - b1);
    m0 = mx0; m1 = mx1;
    ps0 = 0.f; ps1 = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const float p0 = wg_exp2(s[4 * j] - b0), p1 = wg_exp2(s[4 * j + 1] - b0);
      const float p2 = wg_exp2(s[4 * j + 2] - b1), p3 = wg_exp2(s[4 * j + 3] - b1);
      ps0 += p0 + p1; ps1 += p2 + p3;
      pa[j][0] = wg_pack(p0, p1);
      pa[j][1] = wg_pack(p2, p3);
    }
  };
  auto rescale = [&](float al0, float al1, float ps0, float ps1) {
    l0 = l0 * al0 + ps0;
    l1 = l1 * al1 + ps1;
#pragma unroll
    for (int p = 0; p < 2; ++p)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        o[p][4 * j] *= al0; o[p][4 * j + 1] *= al0;
        o[p][4 * j + 2] *= al1; o[p][4 * j + 3] *= al1;
      }
  };
  auto pin_o = [&] {
#pragma unroll
    for (int p = 0; p < 2; ++p)
#pragma unroll
      for (int i = 0; i < 32; ++i) wg_pin(o[p][i]);
  };
  unsigned pa[BN / 8][2];  // packed P: [8-column group j][row r0, row r1]
  float al0, al1, ps0, ps1;
  // tile t in stage st, the plain chain: S, softmax, rescale, P V, each product waited for
  auto chain = [&](int t, int st) {
    issue_s(sK0 + st * BN * 256);
    wg_wait<0>();
#pragma unroll
    for (int i = 0; i < SN; ++i) wg_pin(s[i]);
    softmax(t, pa, al0, al1, ps0, ps1);
    rescale(al0, al1, ps0, ps1);
    issue_pv(pa, sV0 + st * BN * 256);
    wg_wait<0>();
    pin_o();
  };

  if (MB || (WS && !PIPE)) {
    // tile j of the walk lives in stage j % STAGES. MB: its refill with tile j + STAGES is issued at the top
    // of iteration j + 1, once every thread has released tile j (so a warpgroup may run up to a tile ahead
    // of the other instead of meeting it at a block barrier every tile); WS: the producer refills.
    for (int t = t0; t < t1; ++t) {
      const int j = t - t0;
      if (MB && j > 0 && t - 1 + STAGES < t1) {
        const int sp = (j - 1) % STAGES;
        mb_wait(emptyb + 8 * sp, ((j - 1) / STAGES) & 1);
        load_kv(t - 1 + STAGES, sp);
        mb_arrive_cp(fullb + 8 * sp);
      }
      const int st = j % STAGES;
      mb_wait(fullb + 8 * st, (j / STAGES) & 1);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      chain(t, st);
      mb_arrive(emptyb + 8 * st);
    }
  } else if (WS) {
    // WS with PIPE's overlap: S of tile t and P V of tile t - 1 in flight together; a stage is released once
    // the P V that reads its V has completed
    for (int t = t0; t < t1; ++t) {
      const int j = t - t0, st = j % STAGES, sp = (j + STAGES - 1) % STAGES;
      mb_wait(fullb + 8 * st, (j / STAGES) & 1);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      issue_s(sK0 + st * BN * 256);
      if (j > 0) {
        issue_pv(pa, sV0 + sp * BN * 256);
        wg_wait<1>();  // S of tile t
      } else {
        wg_wait<0>();
      }
#pragma unroll
      for (int i = 0; i < SN; ++i) wg_pin(s[i]);
      float al0n, al1n, ps0n, ps1n;
      unsigned pn[BN / 8][2];
      softmax(t, pn, al0n, al1n, ps0n, ps1n);
      wg_wait<0>();  // P V of tile t - 1
      pin_o();
      if (j > 0) mb_arrive(emptyb + 8 * sp);
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) {
        asm volatile("" : "+r"(pa[i][0]), "+r"(pa[i][1])::"memory");
        pa[i][0] = pn[i][0];
        pa[i][1] = pn[i][1];
      }
      rescale(al0n, al1n, ps0n, ps1n);
    }
    issue_pv(pa, sV0 + ((t1 - 1 - t0) % STAGES) * BN * 256);
    wg_wait<0>();
    pin_o();
  } else if (!PIPE) {
    // tile t: wait for its K/V (tile t + 1's in flight), S, softmax, rescale, P V, wait
    for (int t = t0; t < t1; ++t) {
      const int st = (t - t0) & 1;
      if (t + 1 < t1) {
        load_kv(t + 1, st ^ 1);
        cp_commit();
        cp_wait<1>();
      } else {
        cp_wait<0>();
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      __syncthreads();
      chain(t, st);
      __syncthreads();  // every warpgroup is done with this stage before it is loaded again
    }
  } else {
    // FlashAttention-3's overlap inside a warpgroup: S of tile t and P V of tile t - 1 are in flight
    // together; the softmax of tile t runs while P V works. K and V have rings of their own: iteration j
    // loads K of tile t + 1 and V of tile t (one commit group), and needs K of t and V of t - 1, both from
    // the previous group. Run in session 11: slower than the plain chain, and NaN in some checks (NOTES.md).
    auto load_k = [&](int t, int st) {
#pragma unroll
      for (int i = tid; i < BN * 16; i += NT) {
        const int r = i >> 4, ch = i & 15;
        cp16(sK0 + st * BN * 256 + sw(r, ch, BN), kh + (size_t)(t * BN + r) * tok + ch * 8);
      }
    };
    auto load_v = [&](int t, int st) {
#pragma unroll
      for (int i = tid; i < BN * 16; i += NT) {
        const int r = i >> 4, ch = i & 15;
        cp16(sV0 + st * BN * 256 + sw(r, ch, BN), vh + (size_t)(t * BN + r) * tok + ch * 8);
      }
    };
    for (int t = t0; t < t1; ++t) {
      const int j = t - t0;
      cp_wait<0>();
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      __syncthreads();  // K of t and V of t - 1 landed; every warpgroup is done with the slots loaded next
      if (t + 1 < t1) load_k(t + 1, (j + 1) & 1);
      if (j > 0) load_v(t, j & 1);  // the first tile's V came with its K (load_kv above)
      cp_commit();
      issue_s(sK0 + (j & 1) * BN * 256);
      if (j > 0) {
        issue_pv(pa, sV0 + ((j - 1) & 1) * BN * 256);
        wg_wait<1>();  // S of tile t
      } else {
        wg_wait<0>();
      }
#pragma unroll
      for (int i = 0; i < SN; ++i) wg_pin(s[i]);
      float al0n, al1n, ps0n, ps1n;
      unsigned pn[BN / 8][2];
      softmax(t, pn, al0n, al1n, ps0n, ps1n);
      wg_wait<0>();  // P V of tile t - 1: O and pa are free again
      pin_o();
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) {
        asm volatile("" : "+r"(pa[i][0]), "+r"(pa[i][1])::"memory");  // pa live until the product read it
        pa[i][0] = pn[i][0];
        pa[i][1] = pn[i][1];
      }
      rescale(al0n, al1n, ps0n, ps1n);
    }
    cp_wait<0>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    issue_pv(pa, sV0 + ((t1 - 1 - t0) & 1) * BN * 256);
    wg_wait<0>();
    pin_o();
  }

  l0 += __shfl_xor_sync(0xffffffff, l0, 1);
  l0 += __shfl_xor_sync(0xffffffff, l0, 2);
  l1 += __shfl_xor_sync(0xffffffff, l1, 1);
  l1 += __shfl_xor_sync(0xffffffff, l1, 2);
  const float i0 = 1.f / l0, i1 = 1.f / l1;
  __half* oh = reinterpret_cast<__half*>(out) + h * 128;
#pragma unroll
  for (int p = 0; p < 2; ++p)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = 64 * p + 8 * j + 2 * (lane & 3);
      *reinterpret_cast<__half2*>(oh + (size_t)r0 * tok + c) = __floats2half2_rn(o[p][4 * j] * i0, o[p][4 * j + 1] * i0);
      *reinterpret_cast<__half2*>(oh + (size_t)r1 * tok + c) = __floats2half2_rn(o[p][4 * j + 2] * i1, o[p][4 * j + 3] * i1);
    }
  if ((lane & 3) == 0) {
    lse[(size_t)h * N + r0] = (m0 + __log2f(l0)) * 0.6931471805599453f;
    lse[(size_t)h * N + r1] = (m1 + __log2f(l1)) * 0.6931471805599453f;
  }
"""


def smem_bytes(nwg: int, bn: int, stages: int = 2) -> int:
    return 64 * nwg * 256 + 2 * stages * bn * 256 + 1024


def _consts(nwg: int, bn: int, win: bool, pipe: int, stages: int) -> str:
    """The body's compile-time configuration. pipe: 0 one block barrier per tile, 1 PIPE (S and P V of
    consecutive tiles in flight together), 2 MB (per-stage mbarriers instead of block barriers), 3 WS (a
    producer warpgroup fills the ring, the consumers run the plain chain), 4 WS with PIPE's overlap."""
    b = lambda x: "true" if x else "false"  # noqa: E731
    return (f"  constexpr int NWG = {nwg}, BN = {bn}, STAGES = {stages if pipe >= 2 else 2};\n"
            f"  constexpr bool WIN = {b(win)}, PIPE = {b(pipe in (1, 4))}, MB = {b(pipe == 2)}, WS = {b(pipe >= 3)};\n")


def threads(nwg: int, pipe: int) -> int:
    """Threads per block: the consumer warpgroups, plus WS's producer."""
    return 128 * (nwg + (1 if pipe >= 3 else 0))


def full_source(nwg: int, bn: int, win: bool, minb: int = 1, pipe: int = 0, name: str = "wg_attn", stages: int = 2) -> str:
    """The translation unit for nvcc (a stand-in of what cuda_kernel builds)."""
    return (
        "#include <cuda_fp16.h>\n#include <cstdint>\n#include <cmath>\n" + header(bn)
        + f"extern \"C\" __global__ void __launch_bounds__({threads(nwg, int(pipe))}, {minb}) {name}(const __half* q, const __half* k, "
        "const __half* v, const int* prm, const float* scl, __half* out, float* lse) {\n"
        + _consts(nwg, bn, win, int(pipe), stages) + BODY + "}\n"
    )


def _kernel(nwg: int, bn: int, win: bool, minb: int, pipe: int, stages: int = 2):
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name=f"wg_attn_{nwg}_{bn}_{int(win)}_{minb}_{int(pipe)}_{stages}", input_names=["q", "k", "v", "prm", "scl"],
        output_names=["out", "lse"], source=_consts(nwg, bn, win, int(pipe), stages) + BODY,
        header=header(bn) + f"\n#undef __global__\n#define __global__ __location__(global) __launch_bounds__({threads(nwg, int(pipe))}, {minb})\n",
        ensure_row_contiguous=True, shared_memory=smem_bytes(nwg, bn, stages if int(pipe) >= 2 else 2))


def attn(q, k, v, window: int, nwg: int, bn: int, minb: int = 1, pipe: int = 0, stages: int = 2):
    import mlx.core as mx

    n, h, d = q.shape
    assert d == 128 and n % (64 * nwg) == 0 and n % bn == 0
    prm = mx.array([n, h, window], dtype=mx.int32)
    scl = mx.array([math.log2(math.e) / math.sqrt(d)], dtype=mx.float32)
    out, lse = _kernel(nwg, bn, window > 0, minb, pipe, stages)(
        inputs=[q, k, v, prm, scl], grid=(n // (64 * nwg) * threads(nwg, pipe), h, 1), threadgroup=(threads(nwg, pipe), 1, 1),
        output_shapes=[q.shape, (h, n)], output_dtypes=[mx.float16, mx.float32])
    return out, lse


def reference(q, k, v, window: int, rows):
    """float64 reference for the given query rows: (out [len(rows), H, D], lse [H, len(rows)])."""
    n, h, d = q.shape
    q64, k64, v64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    outs, lses = [], []
    for i in rows:
        lo, hi = 0, n
        if window:
            lo = min(max(i - window // 2, 0), n - window)
            hi = lo + window
        s = np.einsum("hd,jhd->hj", q64[i], k64[lo:hi]) / math.sqrt(d)
        m = s.max(axis=1, keepdims=True)
        p = np.exp(s - m)
        l_ = p.sum(axis=1, keepdims=True)
        outs.append(np.einsum("hj,jhd->hd", p / l_, v64[lo:hi]))
        lses.append((m + np.log(l_))[:, 0])
    return np.stack(outs), np.stack(lses, axis=1)


def check(nwg: int, bn: int, minb: int, pipe: int, stages: int = 2) -> None:
    import mlx.core as mx

    rng = np.random.default_rng(nwg * 1000 + bn)
    for n, h, window in ((1024, 2, 0), (2048, 3, 384), (1024, 1, 1000), (4096, 2, 130)):
        q, k, v = (rng.standard_normal((n, h, 128)).astype(np.float16) for _ in range(3))
        out, lse = attn(mx.array(q), mx.array(k), mx.array(v), window, nwg, bn, minb, pipe, stages)
        mx.eval(out, lse)
        rows = sorted(set(rng.integers(0, n, 96).tolist()) | {0, n - 1, n // 2})
        ro, rl = reference(q, k, v, window, rows)
        eo = float(np.abs(np.array(out)[rows].astype(np.float64) - ro).max())
        el = float(np.abs(np.array(lse)[:, rows] - rl).max())
        ok = eo < 2e-2 and el < 2e-2 and np.isfinite(np.array(out)).all()
        print(TAG + json.dumps(dict(kind="check", nwg=nwg, bn=bn, minb=minb, pipe=pipe, stages=stages, n=n, h=h, window=window, out_err=eo, lse_err=el,
                                    ok=bool(ok))), flush=True)


CASES = {"D1": (32768, 1, 0), "G1": (32768, 1, 2048), "D8": (8192, 16, 0), "W2": (65536, 24, 6400)}


def bench(nwg: int, bn: int, minb: int, pipe: int, cases: list[str], stages: int = 2) -> None:
    import mlx.core as mx

    mx.random.seed(0)
    for c in cases:
        n, h, window = CASES[c]
        q, k, v = (mx.random.normal((n, h, 128)).astype(mx.float16) for _ in range(3))
        ms, _ = timed(lambda: attn(q, k, v, window, nwg, bn, minb, pipe, stages)[0], mx.eval)
        f = 4.0 * n * h * (window or n) * 128
        impl = f"wgmma nwg={nwg} bn={bn} minb={minb} pipe={int(pipe)}" + (f" stages={stages}" if pipe >= 2 else "")
        print(TAG + json.dumps(dict(kind="time", impl=impl, case=c, ms=ms, tflops=f / ms / 1e9)),
              flush=True)


def bench_dense(cases: list[str]) -> None:
    import mlx.core as mx

    mx.random.seed(0)
    for c in cases:
        n, h, window = CASES[c]
        q, k, v = (mx.random.normal((1, h, n, 128)).astype(mx.float16) for _ in range(3))
        ms, _ = timed(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(128)), mx.eval)
        f = 4.0 * n * h * (window or n) * 128
        print(TAG + json.dumps(dict(kind="time", impl="mlx-sdpa dense", case=c, ms=ms, tflops=f / ms / 1e9,
                                    note="all keys; TFLOP/s counts the case's window")), flush=True)


# (consumer warpgroups, key tile, resident blocks the registers are bounded for, loop: 0 a block barrier per
# tile, 1 PIPE (S and P V of consecutive tiles in flight together), 2 MB (per-stage mbarriers), [stages of MB's
# ring]), 3 WS (a producer warpgroup), 4 WS with PIPE. Session 10 ran the first five (RESULTS.md, with this file
# as of commit ac1957e); session 11 ran PIPE (slower: 144 registers, one block per SM), MB (no faster) and WS.
CONFIGS = [(2, 64, 2, 0), (2, 64, 2, 2, 2), (2, 32, 2, 2, 4), (2, 64, 1, 2, 3), (2, 64, 1, 0), (2, 64, 1, 1),
           (2, 64, 1, 3, 4), (2, 64, 1, 4, 4), (2, 64, 1, 4, 6)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--emit", help="write each configuration's .cu into this folder and stop")
    ap.add_argument("--child", help="nwg,bn,minb,pipe[,stages]: run that configuration in this process")
    ap.add_argument("--configs", default=",".join("x".join(map(str, c)) for c in CONFIGS))
    ap.add_argument("--cases", default="D1,G1,D8,W2")
    args = ap.parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    cases = args.cases.split(",")
    if args.emit:
        os.makedirs(args.emit, exist_ok=True)
        for nwg, bn, minb, pipe, *st in configs:
            stages = st[0] if st else 2
            for win in (False, True):
                path = os.path.join(args.emit, f"wg_{nwg}_{bn}_{int(win)}_{minb}_{pipe}_{stages}.cu")
                with open(path, "w") as f:
                    f.write(full_source(nwg, bn, win, minb, pipe, stages=stages))
                print(path)
        return
    if args.child:
        if args.child == "dense":
            bench_dense(cases)
            return
        nwg, bn, minb, pipe, *st = (int(x) for x in args.child.split(","))
        stages = st[0] if st else 2
        check(nwg, bn, minb, pipe, stages)
        bench(nwg, bn, minb, pipe, cases, stages)
        return
    rows = []
    for child in ["dense"] + [",".join(map(str, c)) for c in configs]:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", child, "--cases", args.cases],
                           capture_output=True, text=True, timeout=900)
        for line in p.stdout.splitlines():
            if line.startswith(TAG):
                rows.append(json.loads(line[len(TAG):]))
                print(line[len(TAG):], flush=True)
        if p.returncode:
            print(f"child {child} exited {p.returncode}: {p.stderr[-1500:]}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "wgmma-attn.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
