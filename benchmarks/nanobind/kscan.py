#!/usr/bin/env python3
"""How the nanobind tier's forward time splits into a per-query cost and a per-window-FLOP cost.

Times the forward (float32, batch 1, H=4, D=32, stride 1) over kernel sizes at a fixed problem, and
over problem sizes at a fixed kernel, and prints ms, ns per query-head and GFLOP/s. If time grew with
the window's FLOPs (prod(K) * N), K=3 would cost ~1/5 of K=7; it costs much more than that here, which
is the forward's fixed per-query cost (gathers, transposes, softmax bookkeeping, stores).

    python benchmarks/nanobind/kscan.py                 # both scans, the pool's threads
    NATTEN_MLX_NUM_THREADS=1 python benchmarks/nanobind/kscan.py --scan size

Not a test. Medians of interleaved rounds, so the machine's load moves all rows alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
try:
    import natten_mlx  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "packages/natten-mlx-core/src"))

import mlx.core as mx  # noqa: E402
import natten_mlx  # noqa: E402
import numpy as np  # noqa: E402

H, D = 4, 32
FNS = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}


def kernel_cases():
    out = [((64, 64), (k, k)) for k in (3, 5, 7, 9, 11, 13, 15, 17)]
    out += [((16, 32, 32), k) for k in ((3, 3, 3), (3, 5, 5), (3, 7, 7))]
    return out


def size_cases():
    return [((n, n), (3, 3)) for n in (16, 32, 64, 128)] + [((n, n), (7, 7)) for n in (16, 32, 64, 128)]


def make(spatial, kernel):
    rng = np.random.default_rng(0)
    shape = (1, *spatial, H, D)
    q, k, v = (mx.array(rng.standard_normal(shape).astype(np.float32)) for _ in range(3))
    fn = FNS[len(spatial)]

    def run():
        mx.eval(fn(q, k, v, kernel, backend="nanobind"))

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scan", choices=["kernel", "size", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.25, help="per case per round")
    args = ap.parse_args(argv)
    import natten_mlx_nanobind._ext as ext  # noqa: F401  (fails clearly when the tier is not installed)

    cases = {"kernel": kernel_cases(), "size": size_cases()}
    cases["both"] = cases["kernel"] + cases["size"]
    todo = cases[args.scan]
    runs = [make(s, k) for s, k in todo]
    for r in runs:
        r()
    samples = [[] for _ in todo]
    for _ in range(args.rounds):
        for i, r in enumerate(runs):
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < args.seconds or n < 2:
                t = time.perf_counter()
                r()
                samples[i].append(time.perf_counter() - t)
                n += 1
    print(f"threads {ext.num_threads()}, kernels {ext.simd()}, H={H} D={D} float32 forward")
    print(f"{'problem':>12} {'kernel':>8} {'ms':>8} {'ns/query-head':>14} {'GFLOP/s':>8}")
    for (s, k), t in zip(todo, samples):
        ms = float(np.median(t)) * 1e3
        nq = int(np.prod(s)) * H
        fl = 2.0 * nq * int(np.prod(k)) * 2 * D
        print(f"{'x'.join(map(str, s)):>12} {'x'.join(map(str, k)):>8} {ms:8.3f} {ms * 1e6 / nq:14.1f} "
              f"{fl / ms / 1e6:8.1f}")


if __name__ == "__main__":
    main()
