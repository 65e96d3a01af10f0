"""Bit-for-bit comparison of two builds of the nanobind extension: out, lse, dq, dk, dv over 16 shapes.

A kernel change that only reorders work (layouts, transposes, instruction choice) should leave every
float32 bit pattern of the forward outputs and all three gradients as they were; this checks that on
shapes that reach the tier's paths (1D/2D/3D, odd/even kernels, stride, dilation, causal, GQA, D_v != D,
D not a multiple of 8, extra keys/values, rpb). It loads both ``_ext`` modules in one process (as
ab_pair.py does) and prints one line per shape; the exit status is 1 when any bit differs.

    python benchmarks/nanobind/bitcmp.py /tmp/nb_main/natten_mlx_nanobind /tmp/nb_new/natten_mlx_nanobind

NATTEN_MLX_SIMD and NATTEN_MLX_NUM_THREADS apply to both builds: run it once per kernel table.
``--dtype float16|bfloat16`` runs the same shapes in that dtype (the C++ boundary's conversions);
``--layout qkv`` passes q, k, v as slices of one fused [B, *spatial, 3, H, D] buffer (H = H_kv,
D = D_v shapes only; others stay contiguous) and the output gradient as a broadcast view;
``--layout heads-first`` passes them as transposed views of [B, H, *spatial, D] arrays.
"""

import argparse
import os
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_pair import load_ext  # noqa: E402

# (spatial, H, H_kv, D, Dv, kernel, stride, dilation, causal, extra, rpb)
SHAPES = [
    ((4096,), 4, 4, 32, 32, (7,), (1,), (1,), (False,), 0, False),
    ((64, 64), 4, 4, 32, 32, (7, 7), (1, 1), (1, 1), (False, False), 0, False),
    ((64, 64), 4, 4, 32, 32, (13, 13), (1, 1), (2, 2), (False, False), 0, False),
    ((16, 32, 32), 4, 4, 32, 32, (3, 7, 7), (1, 1, 1), (1, 1, 1), (False, False, False), 0, False),
    ((37, 29), 2, 2, 32, 32, (5, 7), (1, 1), (1, 1), (True, False), 0, False),
    ((40, 36), 2, 2, 16, 16, (6, 4), (2, 3), (1, 2), (False, False), 0, False),
    ((33, 47), 4, 2, 20, 36, (7, 7), (1, 1), (1, 1), (False, False), 0, False),
    ((24, 24), 2, 1, 32, 32, (15, 17), (1, 1), (1, 1), (False, False), 0, False),
    ((30, 30), 2, 2, 32, 24, (5, 5), (1, 1), (3, 2), (False, True), 0, False),
    ((32, 32), 3, 3, 32, 32, (7, 7), (1, 1), (1, 1), (False, False), 0, True),
    ((32, 32), 2, 2, 32, 32, (7, 7), (1, 1), (1, 1), (False, False), 5, False),
    ((8, 12, 14), 2, 2, 24, 24, (3, 5, 5), (1, 2, 1), (2, 1, 1), (True, False, False), 0, False),
    ((10, 16, 16), 2, 2, 32, 32, (4, 4, 6), (1, 1, 1), (1, 1, 2), (False, False, False), 0, False),
    ((9, 9, 9), 1, 1, 8, 8, (3, 3, 3), (1, 1, 1), (1, 1, 1), (False, False, False), 0, False),
    ((2000,), 2, 2, 36, 20, (31,), (2,), (3,), (True,), 0, False),
    ((16, 16), 8, 2, 64, 64, (9, 9), (1, 1), (1, 1), (False, False), 3, False),
]


def run(ext, shape, seed=0, dtype="float32", layout="contiguous"):
    spatial, h, hkv, d, dv, kern, stride, dil, causal, extra, rpb = shape
    rng = np.random.default_rng(seed)
    dt = getattr(mx, dtype)

    def arr(*s, lse=False):
        x = mx.array(rng.standard_normal(s).astype(np.float32))
        return x if lse else x.astype(dt)

    def heads_first(*s):  # [B, *spatial, H, W] as a transposed view of [B, H, *spatial, W]
        x = arr(s[0], s[-2], *s[1:-2], s[-1])
        n = len(s)
        return x.transpose(0, *range(2, n - 1), 1, n - 1)

    if layout == "qkv" and h == hkv and d == dv:
        qkv = arr(1, *spatial, 3, h, d)
        q, k, v = (qkv[..., i, :, :] for i in range(3))
    elif layout == "heads-first":
        q, k, v = heads_first(1, *spatial, h, d), heads_first(1, *spatial, hkv, d), heads_first(1, *spatial, hkv, dv)
    else:
        q, k, v = arr(1, *spatial, h, d), arr(1, *spatial, hkv, d), arr(1, *spatial, hkv, dv)
    ek = arr(1, extra, hkv, d) if extra else None
    ev = arr(1, extra, hkv, dv) if extra else None
    rb = arr(h, *[2 * kk - 1 for kk in kern]) if rpb else None
    kw = dict(kernel_size=kern, stride=stride, dilation=dil, is_causal=causal)
    cot, clse = arr(1, *spatial, h, dv), arr(1, *spatial, h, lse=True)
    if layout == "qkv":
        cot = mx.broadcast_to(arr(1, 1, dv), cot.shape)

    def f(a, b, c):
        out, lse = ext.fused_forward(a, b, c, ek, ev, rb, **kw)
        return out, lse

    (out, lse), (dq, dk, dv_) = mx.vjp(lambda a, b, c: f(a, b, c), [q, k, v], [cot, clse])
    mx.eval(out, lse, dq, dk, dv_)
    bits = lambda x: np.array(x.view(mx.uint32 if x.dtype == mx.float32 else mx.uint16))  # noqa: E731
    return {n: bits(x) for n, x in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv_))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="folder of the old build's natten_mlx_nanobind package")
    ap.add_argument("new", help="folder of the new build's package")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--layout", default="contiguous", choices=("contiguous", "qkv", "heads-first"))
    args = ap.parse_args()
    exts = (load_ext("bc_old", args.old), load_ext("bc_new", args.new))
    bad = 0
    for i, shape in enumerate(SHAPES):
        a, b = (run(e, shape, dtype=args.dtype, layout=args.layout) for e in exts)
        diffs = {n: int((a[n] != b[n]).sum()) for n in a}
        ok = not any(diffs.values())
        bad += not ok
        print(f"{i:2d} {shape[0]} K{shape[5]} s{shape[6]} d{shape[7]} c{shape[8]} H{shape[1]}/{shape[2]} "
              f"D{shape[3]}/{shape[4]} extra{shape[9]} rpb{int(shape[10])}: "
              + ("bitwise equal" if ok else "DIFFER " + " ".join(f"{n}:{c}" for n, c in diffs.items() if c)),
              flush=True)
    print(f"{len(SHAPES) - bad}/{len(SHAPES)} shapes bitwise equal")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
