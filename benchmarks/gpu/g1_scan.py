#!/usr/bin/env python3
# ruff: noqa: B023  (the timed closures are called within the loop iteration that defines them)
"""Where G1's forward time goes: the tier's forward (inside mx.compile, so no Python per call) over 1D
problems of one head, head dim 128, float16, with the number of blocks (tokens) and the key tiles each
block walks (window) varied. A fit of time against tiles per block at a fixed grid separates the
per-block fixed cost (launch, prologue, Q load, epilogue) from the per-tile rate.

    source .device/setup.sh && python3 benchmarks/gpu/g1_scan.py [--opts wgmma=0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cuda import case_inputs, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--opts", default="", help="backend options, name=value,... (ints or 0/1 for bools)")
    ap.add_argument("--grid", default="16384,32768,65536")
    ap.add_argument("--windows", default="256,512,1024,2048,4096")
    args = ap.parse_args()
    import mlx.core as mx
    from natten_mlx_cuda import plan
    from natten_mlx_cuda.backend import CudaBackend

    opts = {}
    for kv in filter(None, args.opts.split(",")):
        k, v = kv.split("=")
        opts[k] = (v != "0") if k in ("wgmma", "ldmatrix") else int(v)
    be = CudaBackend().configure(**opts)
    rows = []
    for n in map(int, args.grid.split(",")):
        for w in map(int, args.windows.split(",")):
            if w > n:
                continue
            p, q, k, v, _ = case_inputs(1, (n,), (w,), 1, 128)
            geo = plan.geometry(p)
            launch = be._forward_launch(geo, "float16", "float16", False)
            t = dict(launch.variant.template)
            qt, kt = t["QT2"], t["KT2"]
            blocks = launch.grid[0] // launch.threadgroup[0]
            tiles = -(-(w + qt - 1) // kt) + 1  # key tiles a block's union of windows can straddle (upper bound)
            fwd = mx.compile(lambda q_, k_, v_: be.fused_forward(p, q_, k_, v_))
            ms, _ = timed(lambda: fwd(q, k, v), mx.eval)
            flops = 4 * n * w * 128
            row = dict(n=n, window=w, qt=qt, kt=kt, wg=bool(t.get("WG")), blocks=blocks, tiles_bound=tiles, ms=ms,
                       useful_tflops=flops / ms / 1e9)
            rows.append(row)
            print(json.dumps(row), flush=True)
    # fit per grid: ms = a + b * tiles
    for n in sorted({r["n"] for r in rows}):
        rs = [r for r in rows if r["n"] == n]
        if len(rs) >= 3:
            x = np.array([r["tiles_bound"] for r in rs], float)
            y = np.array([r["ms"] for r in rs], float)
            b, a = np.polyfit(x, y, 1)
            print(json.dumps(dict(fit_n=n, fixed_ms=a, per_tile_us=b * 1e3, blocks=rs[0]["blocks"])), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "g1-scan.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
