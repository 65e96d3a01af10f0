"""rpb (NATTEN 0.14-0.17's relative positional bias) on the exact-window path, 1D, 2D and 3D.

Since session 21 the exact path's kernels add the bias themselves (one rpb entry per key row and slot of a
block: slot x of every lane is the same key - query offset along the last axis; border blocks on permuted
slots pick each lane's entry) and the backward sums dS over a row's queries into the rpb gradient; before,
every problem with rpb went to the tile path (2.5-3.4x the time of the same problem without rpb). In 1D,
rpb takes the exact path's transposed copies (the kernels of NATTEN_MLX_ROW1D=0), as the row kernels
add no bias.

Here, on geometries that take runs, border blocks on permuted and on plain slots, short last-axis groups,
dilation, even kernels, strided windows, GQA, D != Dv, batch > 1, 1D, the streamed 2D path and 3D: the path
counters say the exact path served queries with rpb (the tile path alone would fail this), and out, lse
and the gradients of q, k, v and rpb match the float64 oracle (tests/oracle.py) with an lse cotangent, on
both forward kernels (value rows and transposed values) and with the exact path turned off (the tiles).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import oracle
import pytest
from nb_checks import assert_close

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)
ext = nb.extension()

# (shape, kernel, stride, dilation, Hkv, G, D, Dv, B)
GEOS = [
    ((24, 64), (7, 7), (1, 1), (1, 1), 4, 1, 32, 32, 1),  # C2's rows: runs and border blocks, streamed
    ((14, 14), (7, 7), (1, 1), (1, 1), 2, 1, 32, 32, 2),  # NAT's 14 x 14: short groups
    ((28, 28), (7, 7), (1, 1), (2, 2), 2, 1, 32, 32, 1),  # DiNAT-style dilation, groups of 14
    ((20, 80), (5, 9), (1, 1), (2, 1), 2, 2, 16, 32, 1),  # GQA, D != Dv, dilation along the first axis
    ((16, 64), (13, 13), (1, 1), (1, 2), 1, 1, 32, 32, 1),  # C3-like: dilation along the last axis
    ((16, 70), (6, 8), (1, 1), (1, 1), 1, 1, 16, 16, 1),  # even kernels
    ((10, 37), (4, 6), (1, 1), (1, 2), 2, 2, 16, 24, 1),  # even kernels, dilation, groups of 18-19
    ((12, 48), (7, 7), (2, 1), (1, 1), 2, 1, 16, 16, 1),  # strided along the first axis
    ((8, 50), (3, 9), (1, 2), (2, 1), 2, 1, 16, 16, 1),  # strided along the last axis
    ((9, 40), (3, 7), (1, 1), (1, 1), 2, 1, 16, 16, 2),  # batch 2
    ((4, 8, 64), (3, 3, 7), (1, 1, 1), (1, 1, 1), 2, 1, 16, 16, 1),  # 3D with runs
    ((5, 6, 33), (3, 3, 7), (1, 1, 1), (1, 1, 1), 2, 1, 8, 8, 1),  # 3D, rows of 33 (C4's border blocks)
    ((4, 8, 34), (2, 3, 4), (1, 1, 1), (1, 2, 2), 1, 2, 8, 12, 2),  # 3D, even kernels, dilation, GQA
    ((1024,), (7,), (1,), (1,), 4, 1, 32, 32, 1),  # C1's rows
    ((300,), (13,), (1,), (2,), 2, 2, 16, 24, 2),  # 1D: dilation, GQA, D != Dv, batch 2
    ((777,), (8,), (1,), (1,), 1, 3, 16, 16, 1),  # 1D: even kernel, MQA
    ((200,), (31,), (3,), (1,), 2, 1, 16, 16, 1),  # 1D: strided windows (border blocks only)
]


def _ids(g):
    shape, K, s, d, Hkv, G, D, Dv, B = g
    return (
        f"L{'x'.join(map(str, shape))}-K{'x'.join(map(str, K))}-s{''.join(map(str, s))}"
        f"-d{''.join(map(str, d))}-kv{Hkv}G{G}D{D}v{Dv}B{B}"
    )


def _run(geo, seed, dtype=mx.float32):
    """the op's out, lse and the gradients of q, k, v, rpb (float64), the inputs as the op saw them, and the
    call's path counters"""
    shape, K, s, d, Hkv, G, D, Dv, B = geo
    H = Hkv * G
    rng = np.random.default_rng(seed)
    arrs = [
        rng.standard_normal((B, *shape, H, D)),
        rng.standard_normal((B, *shape, Hkv, D)),
        rng.standard_normal((B, *shape, Hkv, Dv)),
        rng.standard_normal((H, *[2 * k - 1 for k in K])),
        rng.standard_normal((B, *shape, H, Dv)),
        rng.standard_normal((B, *shape, H)),
    ]
    xs = [mx.array(x.astype(np.float32)).astype(dtype) for x in arrs[:5]] + [mx.array(arrs[5].astype(np.float32))]
    q, k, v, rpb, cot, clse = xs
    kw = dict(kernel_size=list(K), stride=list(s), dilation=list(d), is_causal=[False] * len(shape))
    ext.path_counts(True)
    outs, grads = mx.vjp(lambda a, b, c, r: ext.fused_forward(a, b, c, None, None, r, **kw), [q, k, v, rpb],
                         [cot, clse])
    mx.eval(outs, grads)
    counts = ext.path_counts(True)
    got = [np.array(x.astype(mx.float32), np.float64) for x in (*outs, *grads)]
    return got, [np.array(x.astype(mx.float32), np.float64) for x in xs], geo, counts


def _want(arrs, geo):
    q, k, v, rpb, cot, clse = arrs
    shape, K, s, d = geo[:4]
    win = dict(kernel_size=K, stride=s, dilation=d)
    out, lse = oracle.na_forward(q, k, v, **win, rpb=rpb)
    gr = oracle.na_backward(q, k, v, **win, rpb=rpb, dout=cot, dlse=clse)
    return out, lse, gr["q"], gr["k"], gr["v"], gr["rpb"]


NAMES = ("out", "lse", "dq", "dk", "dv", "drpb")


@pytest.mark.parametrize("geo", GEOS, ids=[_ids(g) for g in GEOS])
def test_rpb_exact_path(geo, monkeypatch):
    for var in ("NATTEN_MLX_EXACT", "NATTEN_MLX_PVROWS", "NATTEN_MLX_SHORT", "NATTEN_MLX_ROW2D", "NATTEN_MLX_ROW1D"):
        monkeypatch.delenv(var, raising=False)
    got, arrs, _, counts = _run(geo, 11)
    # the exact path (runs or border blocks) served queries in the forward and in the backward
    assert counts[0] + counts[1] > 0 and counts[3] + counts[4] > 0, f"rpb left to the tiles: {counts[:6]}"
    for g_, w, what in zip(got, _want(arrs, geo), NAMES):
        assert_close(g_, w, 3e-5, what)


@pytest.mark.parametrize("geo", [GEOS[0], GEOS[3], GEOS[10]], ids=[_ids(g) for g in (GEOS[0], GEOS[3], GEOS[10])])
def test_rpb_exact_path_transposed_values(geo, monkeypatch):
    # the forward's P.V on transposed values (exact_fwd2 / exact_fwd) instead of value rows (exact_fwd2r), and
    # the gathered-rows forward (NATTEN_MLX_ROW2D=1), which does not take rpb and leaves it to the transposed path
    monkeypatch.setenv("NATTEN_MLX_PVROWS", "0")
    monkeypatch.setenv("NATTEN_MLX_ROW2D", "1")
    got, arrs, _, counts = _run(geo, 12)
    assert counts[0] + counts[1] > 0, counts[:6]
    for g_, w, what in zip(got, _want(arrs, geo), NAMES):
        assert_close(g_, w, 3e-5, what)


@pytest.mark.parametrize("geo", [GEOS[0], GEOS[1], GEOS[11]], ids=[_ids(g) for g in (GEOS[0], GEOS[1], GEOS[11])])
def test_rpb_tile_path_when_off(geo, monkeypatch):
    monkeypatch.setenv("NATTEN_MLX_EXACT", "0")
    got, arrs, _, counts = _run(geo, 13)
    assert counts[0] + counts[1] == 0 and counts[2] > 0, counts[:6]
    for g_, w, what in zip(got, _want(arrs, geo), NAMES):
        assert_close(g_, w, 3e-5, what)


def test_rpb_exact_path_float16(monkeypatch):
    monkeypatch.delenv("NATTEN_MLX_EXACT", raising=False)
    got, arrs, _, counts = _run(GEOS[0], 14, dtype=mx.float16)
    assert counts[0] + counts[1] > 0, counts[:6]
    for g_, w, what, tol in zip(got, _want(arrs, GEOS[0]), NAMES, (3e-3, 1e-4, 3e-2, 3e-2, 3e-2, 3e-2)):
        assert_close(g_, w, tol, what)


@pytest.mark.parametrize("row1d", ["0", "1"])
def test_rpb_1d_either_row_setting(row1d, monkeypatch):
    # NATTEN_MLX_ROW1D=1 (the default) serves 1D problems without rpb on the row kernels; with rpb both
    # settings take the transposed copies
    monkeypatch.delenv("NATTEN_MLX_EXACT", raising=False)
    monkeypatch.setenv("NATTEN_MLX_ROW1D", row1d)
    geo = ((120,), (9,), (1,), (1,), 2, 1, 16, 16, 1)
    got, arrs, _, counts = _run(geo, 15)
    assert counts[0] + counts[1] > 0 and counts[3] + counts[4] > 0, counts[:6]
    for g_, w, what in zip(got, _want(arrs, geo), NAMES):
        assert_close(g_, w, 3e-5, what)
