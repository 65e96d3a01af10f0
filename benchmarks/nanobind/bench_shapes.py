"""The nanobind tier on the attention shapes of NAT and DiNAT classifiers (224 x 224 input: stages of 56, 28,
14 and 7 tokens per side, head dim 32, kernel 7; DiNAT's dilated layers 8 / 4 / 2 / 1, so every dilation
group is 7 tokens long), float32, forward and forward+backward.

Most of these have last-axis groups shorter than the kernels' vector (16 queries with AVX-512): each is one
border block of the exact-window path since session 20, where the tile path served them before
(NATTEN_MLX_SHORT=0 brings that back, read per call). Per shape this runs the two settings paired in one
process (alternating windows of calls, both orders, the median of the per-window ratios), the tier's
median time and its GFLOP/s (the op's forward FLOPs 2 * N * H * K^2 * (D + Dv), 3.5x that for
forward+backward, over the median time).

    PYTHONPATH=<tier>:packages/natten-mlx-core/src python benchmarks/nanobind/bench_shapes.py [--seconds 3]

--rpb gives every layer a relative positional bias (NATTEN 0.14-0.17's NAT/DiNAT layers all have one) and
pairs the exact-window path against the tile path instead (NATTEN_MLX_EXACT unset / 0, read per call): the
exact path has served 2D/3D problems with rpb since session 21, the tiles every one before.

Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import mlx.core as mx
import natten_mlx_nanobind as nb

# (name, batch, side, heads, dilation)
SHAPES = [
    ("NAT s1", 4, 56, 2, 1),
    ("NAT s2", 4, 28, 4, 1),
    ("NAT s3", 4, 14, 8, 1),
    ("NAT s4", 4, 7, 16, 1),
    ("DiNAT s1 dil8", 4, 56, 2, 8),
    ("DiNAT s2 dil4", 4, 28, 4, 4),
    ("DiNAT s3 dil2", 4, 14, 8, 2),
]
D = 32


def make(ext, B, side, H, dil, K, mode, rpb=False):
    shp = (B, side, side, H, D)
    kw = dict(kernel_size=[K, K], stride=[1, 1], dilation=[dil, dil], is_causal=[False, False])
    q, k, v = (mx.random.normal(shp) for _ in range(3))
    r = mx.random.normal((H, 2 * K - 1, 2 * K - 1)) if rpb else None
    cot = mx.ones(shp)
    mx.eval(q, k, v, cot)
    if r is not None:
        mx.eval(r)

    def call():
        t = time.perf_counter()
        if mode == "fwd":
            mx.eval(ext.fused_forward(q, k, v, None, None, r, **kw)[0])
        else:
            inputs = [q, k, v] + ([r] if rpb else [])
            o, g = mx.vjp(lambda *xs: ext.fused_forward(*xs[:3], None, None, *xs[3:], **kw)[0], inputs, [cot])
            mx.eval(o, g)
        return time.perf_counter() - t

    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="per shape and mode")
    ap.add_argument("--shapes", default="", help="B:side:H:dilation,... instead of the NAT/DiNAT list")
    ap.add_argument("--kernel", type=int, default=7, help="kernel size along both axes")
    ap.add_argument("--rpb", action="store_true", help="with rpb, the exact path paired against the tiles")
    args = ap.parse_args()
    # the setting paired: its value on, then off
    var, on, off = ("NATTEN_MLX_EXACT", "2", "0") if args.rpb else ("NATTEN_MLX_SHORT", "1", "0")
    label = "exact path" if args.rpb else "short groups"
    label_s = "exact" if args.rpb else "short"
    K = args.kernel
    shapes = SHAPES
    if args.shapes:
        shapes = []
        for item in args.shapes.split(","):
            B, side, H, dil = map(int, item.split(":"))
            shapes.append((f"{side}x{side} dil{dil}", B, side, H, dil))
    ext = nb.extension()
    print(f"natten-mlx-nanobind, kernels {ext.simd()}, {ext.num_threads()} threads; float32, D={D}, K={K}"
          + (", rpb" if args.rpb else ""))
    print(f"| shape | mode | {label} ms (median) | tile path ms (median) | paired {label_s} / tiles | GFLOP/s {label_s} "
          "| GFLOP/s tiles |")
    print("|---|---|---|---|---|---|---|")
    for name, B, side, H, dil in shapes:
        for mode in ("fwd", "fwdbwd"):
            call = make(ext, B, side, H, dil, K, mode, args.rpb)
            res = {on: [], off: []}
            ratios = []
            t_end = time.time() + args.seconds
            i = 0
            while time.time() < t_end or i < 4:
                order = (on, off) if i % 2 == 0 else (off, on)
                win = {}
                for val in order:
                    os.environ[var] = val
                    call()
                    ts = sorted(call() for _ in range(3))
                    win[val] = ts[1]
                    res[val].append(ts[1])
                ratios.append(win[on] / win[off])
                i += 1
            os.environ.pop(var, None)
            med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
            flops = 2 * B * side * side * H * K * K * 2 * D * (3.5 if mode == "fwdbwd" else 1.0)
            r = sorted(ratios)[len(ratios) // 2]
            geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
            print(f"| {name} ({B}x{side}x{side}, H={H}) | {mode} | {med[on] * 1e3:.3f} | {med[off] * 1e3:.3f} | "
                  f"{r:.3f} (geo {geo:.3f}, n={len(ratios)}) | {flops / med[on] / 1e9:.1f} | {flops / med[off] / 1e9:.1f} |")


if __name__ == "__main__":
    main()
