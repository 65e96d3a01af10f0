#!/usr/bin/env python3
"""One-off study on the lent GPU: correctness of the slices strategy's 3D split ops (after the
10-dimension fix) and the tiled strategy's variants on the large 2D/3D cases (tile shape, fused
SDPA with a mask vs explicit matmuls). Prints one line per measurement.

    source .device/setup.sh && python3 benchmarks/gpu/tile_study.py
"""
import os, sys, time
import numpy as np
import mlx.core as mx

import natten_mlx as na
from natten_mlx import tiles
from natten_mlx.backends import pure as P
from natten_mlx.windows import neighborhood_mask

print("device", mx.default_device(), flush=True)
t_start = time.time()

# ---- A: slices strategy on the GPU, 3D split ops and backward, against gather (TF32 off) ----
rng = np.random.default_rng(0)
for spatial, ks, st, dl, cs in [((6, 10, 12), (3, 5, 4), (1, 2, 3), (2, 1, 2), (True, False, False)),
                                 ((8, 12, 12), (3, 7, 7), (1, 1, 1), (1, 1, 1), (False, False, False))]:
    q = mx.array(rng.standard_normal((1, *spatial, 4, 16)).astype(np.float32))
    k = mx.array(rng.standard_normal((1, *spatial, 2, 16)).astype(np.float32))
    v = mx.array(rng.standard_normal((1, *spatial, 2, 16)).astype(np.float32))
    res = {}
    for strat in ("slices", "gather"):
        os.environ["NATTEN_MLX_PURE_STRATEGY"] = strat
        def loss(q, k, v):
            a = na.na3d_qk(q, k, ks, st, dl, cs)
            o = na.na3d_av(mx.softmax(a.astype(mx.float32), -1), v, ks, st, dl, cs)
            o2, l2 = na.na3d(q, k, v, ks, st, dl, cs, return_lse=True)
            return (o * o).sum() + (o2 * o).sum() + l2.sum()
        val, g = mx.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
        mx.eval(val, g)
        res[strat] = [val, *g]
    err = max(float(mx.abs(a - b).max()) for a, b in zip(res["slices"], res["gather"]))
    print(f"A slices-vs-gather 3D {spatial} K={ks}: max err {err:.2e}", flush=True)
os.environ.pop("NATTEN_MLX_PURE_STRATEGY", None)


def timeit(f, reps=5):
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def variant(case, spatial, K, heads, tile, lse):
    tiles.tile_plan.cache_clear(); P._plan.cache_clear()
    orig = tiles.default_tile
    if tile is not None:
        tiles.default_tile = lambda sp, ks: tuple(min(t, n) for t, n in zip(tile, sp))
    try:
        q = mx.random.normal((1, *spatial, heads, 128)).astype(mx.float16)
        k = mx.random.normal((1, *spatial, heads, 128)).astype(mx.float16)
        v = mx.random.normal((1, *spatial, heads, 128)).astype(mx.float16)
        mx.eval(q, k, v)
        op = {1: na.na1d, 2: na.na2d, 3: na.na3d}[len(spatial)]
        f = lambda: mx.eval(op(q, k, v, K, return_lse=lse))
        mx.reset_peak_memory()
        ms = timeit(f, reps=3)
        peak = mx.get_peak_memory() / 2**30
        print(f"B {case} tile={tile or orig(spatial, K)} lse={lse}: {ms:.1f} ms, peak {peak:.1f} GiB "
              f"({time.time() - t_start:.0f} s)", flush=True)
    except Exception as exc:
        print(f"B {case} tile={tile} lse={lse}: error {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    finally:
        tiles.default_tile = orig
        tiles.tile_plan.cache_clear(); P._plan.cache_clear()
        mx.clear_cache()


G1 = ((32768,), (2048,), 1)
G2 = ((256, 256), (80, 80), 24)
G3 = ((30, 48, 80), (18, 24, 24), 24)
C2 = ((64, 64), (7, 7), 4)
C4 = ((16, 32, 32), (3, 7, 7), 4)
plan = [("G1", G1, None), ("G2", G2, None), ("G3", G3, None), ("C4", C4, None)]
if "--quick" not in sys.argv:
    for name, case, tile in plan:
        if time.time() - t_start > 400:
            break
        variant(name, *case, tile, False)
print("done", round(time.time() - t_start), "s")
