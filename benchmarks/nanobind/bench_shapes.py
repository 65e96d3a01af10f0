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


def make(ext, B, side, H, dil, K, mode):
    shp = (B, side, side, H, D)
    kw = dict(kernel_size=[K, K], stride=[1, 1], dilation=[dil, dil], is_causal=[False, False])
    q, k, v = (mx.random.normal(shp) for _ in range(3))
    cot = mx.ones(shp)
    mx.eval(q, k, v, cot)

    def call():
        t = time.perf_counter()
        if mode == "fwd":
            mx.eval(ext.fused_forward(q, k, v, **kw)[0])
        else:
            o, g = mx.vjp(lambda a, b, c: ext.fused_forward(a, b, c, **kw)[0], [q, k, v], [cot])
            mx.eval(o, g)
        return time.perf_counter() - t

    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="per shape and mode")
    ap.add_argument("--shapes", default="", help="B:side:H:dilation,... instead of the NAT/DiNAT list")
    ap.add_argument("--kernel", type=int, default=7, help="kernel size along both axes")
    args = ap.parse_args()
    K = args.kernel
    shapes = SHAPES
    if args.shapes:
        shapes = []
        for item in args.shapes.split(","):
            B, side, H, dil = map(int, item.split(":"))
            shapes.append((f"{side}x{side} dil{dil}", B, side, H, dil))
    ext = nb.extension()
    print(f"natten-mlx-nanobind, kernels {ext.simd()}, {ext.num_threads()} threads; float32, D={D}, K={K}")
    print("| shape | mode | short groups ms (median) | tile path ms (median) | paired short / tiles | GFLOP/s short | GFLOP/s tiles |")
    print("|---|---|---|---|---|---|---|")
    for name, B, side, H, dil in shapes:
        for mode in ("fwd", "fwdbwd"):
            call = make(ext, B, side, H, dil, K, mode)
            res = {"1": [], "0": []}
            ratios = []
            t_end = time.time() + args.seconds
            i = 0
            while time.time() < t_end or i < 4:
                order = ("1", "0") if i % 2 == 0 else ("0", "1")
                win = {}
                for val in order:
                    os.environ["NATTEN_MLX_SHORT"] = val
                    call()
                    ts = sorted(call() for _ in range(3))
                    win[val] = ts[1]
                    res[val].append(ts[1])
                ratios.append(win["1"] / win["0"])
                i += 1
            os.environ.pop("NATTEN_MLX_SHORT", None)
            med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
            flops = 2 * B * side * side * H * K * K * 2 * D * (3.5 if mode == "fwdbwd" else 1.0)
            r = sorted(ratios)[len(ratios) // 2]
            geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
            print(f"| {name} ({B}x{side}x{side}, H={H}) | {mode} | {med['1'] * 1e3:.3f} | {med['0'] * 1e3:.3f} | "
                  f"{r:.3f} (geo {geo:.3f}, n={len(ratios)}) | {flops / med['1'] / 1e9:.1f} | {flops / med['0'] / 1e9:.1f} |")


if __name__ == "__main__":
    main()
