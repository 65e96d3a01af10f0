"""Paired comparison of the nanobind tier's kernel tables (NATTEN_MLX_SIMD) on one case.

The table is chosen once per process, so each table runs in its own child process: every round
starts one child per table (the order alternating from round to round), each times
``natten_mlx.na{1,2,3}d(..., backend="nanobind")`` for a few seconds per mode and reports its median.
The parent prints per table the median over rounds of those medians and the median over rounds of
the per-round ratios against the first table (which the machine's load moves much less).

    PYTHONPATH=/tmp/build:packages/natten-mlx-core/src python3 benchmarks/nanobind/simd_pair.py \\
        --case C1 --tables default,avx2 --rounds 8 --seconds 3

"default" leaves NATTEN_MLX_SIMD unset (the best table this CPU runs).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(case, modes, seconds):
    sys.path.insert(0, HERE)
    import mlx.core as mx
    import natten_mlx
    import natten_mlx_nanobind._ext as ext
    import numpy as np
    from bench_cpu import CASES, D, H

    c = CASES[case]
    fn = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}[len(c["spatial"])]
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((1, *c["spatial"], H, D)).astype(np.float32)) for _ in range(3))
    kw = dict(kernel_size=c["kernel"], dilation=c["dilation"], backend="nanobind")
    cot = mx.ones_like(q)

    def fwd():
        mx.eval(fn(q, k, v, **kw))

    def fwdbwd():
        outs, grads = mx.vjp(lambda a, b, c_: fn(a, b, c_, **kw), [q, k, v], [cot])
        mx.eval(outs, grads)

    res = {"simd": ext.simd()}
    for mode in modes:
        f = {"fwd": fwd, "fwdbwd": fwdbwd}[mode]
        for _ in range(3):
            f()
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        res[mode] = (float(np.median(times)) * 1e3, len(times))
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="C1")
    ap.add_argument("--tables", default="default,avx2", help="comma-separated NATTEN_MLX_SIMD values")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per mode per child")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    modes = a.modes.split(",")
    if a.child:
        child(a.case, modes, a.seconds)
        return
    tables = a.tables.split(",")
    runs = {t: [] for t in tables}
    for r in range(a.rounds):
        for t in tables if r % 2 == 0 else tables[::-1]:
            env = dict(os.environ)
            env.pop("NATTEN_MLX_SIMD", None)
            if t != "default":
                env["NATTEN_MLX_SIMD"] = t
            cmd = [sys.executable, __file__, "--child", "--case", a.case, "--modes", a.modes, "--seconds", str(a.seconds)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            runs[t].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {r}: " + "  ".join(f"{t}({runs[t][-1]['simd']}) " + " ".join(
            f"{m} {runs[t][-1][m][0]:.3f}" for m in modes) for t in tables), flush=True)

    def med(xs):
        xs = sorted(xs)
        n = len(xs)
        return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])

    base = tables[0]
    print(f"\n{a.case}, {a.rounds} rounds, {a.seconds} s per mode per child; ms: median over rounds of each child's median")
    for t in tables:
        cells = []
        for m in modes:
            ms = med([x[m][0] for x in runs[t]])
            n = sum(x[m][1] for x in runs[t])
            cell = f"{m} {ms:.3f} ms (n {n})"
            if t != base:
                ratio = med([x[m][0] / y[m][0] for x, y in zip(runs[t], runs[base])])
                cell += f", {t}/{base} {ratio:.3f}"
            cells.append(cell)
        print(f"  {t} ({runs[t][0]['simd']}): " + "; ".join(cells))


if __name__ == "__main__":
    main()
