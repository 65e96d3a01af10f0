"""2D/3D problems whose last-axis groups are shorter than the kernels' vector (16 queries with AVX-512, 8
with AVX2): NAT's 14 x 14 and 7 x 7 stages, DiNAT's dilated 28 x 28 (groups of 14). Each such group is
one border block of the exact-window path, its lanes past the group serving no query, when the group
holds at least 5/8 of the vector with AVX-512 (10-15 queries; shorter groups, and AVX2's, stay on the tile path);
NATTEN_MLX_SHORT=0, read per call, leaves them all to the tile path, as before.

Here, on geometries with groups of 2-15 queries (dilation, even and causal kernels, stride, GQA, D != Dv,
float16, the streamed 2D path and 3D): the path counters say the exact path served every query (and the
tiles did with NATTEN_MLX_SHORT=0); forward and backward match the float64 oracle on both paths, with an
lse cotangent; and the key side's rows, closer than a vector there, keep every sum (summing three of
them per pass on rows L2 apart lost updates, which the oracle catches on dk and dv; since session 24 the
key side's sums keep such rows a vector apart and sum three per pass again).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import oracle
import pytest
from nb_checks import assert_close, fused_vjp

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)
ext = nb.extension()

# (shape, kernel, stride, dilation, causal, Hkv, G, D, Dv, B)
GEOS = [
    ((14, 14), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32, 2),
    ((7, 7), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32, 2),
    ((28, 28), (7, 7), (1, 1), (2, 2), (False, False), 2, 1, 32, 32, 2),
    ((14, 14), (7, 7), (1, 1), (2, 2), (False, False), 2, 2, 16, 48, 1),
    ((12, 10), (4, 6), (1, 1), (1, 1), (True, False), 2, 1, 32, 16, 2),
    ((9, 13), (3, 5), (2, 1), (1, 1), (False, True), 2, 1, 16, 32, 1),
    ((16, 15), (5, 5), (1, 3), (1, 1), (False, False), 2, 1, 24, 20, 2),
    ((6, 8, 12), (3, 3, 5), (1, 1, 1), (1, 1, 2), (False, False, True), 2, 1, 32, 32, 2),
    ((4, 6, 5), (2, 3, 2), (2, 1, 1), (2, 1, 1), (False, False, True), 2, 3, 8, 4, 1),
    ((10, 2), (3, 2), (1, 1), (1, 1), (False, False), 1, 2, 16, 16, 2),
    ((3, 3, 2), (2, 3, 2), (1, 1, 2), (1, 1, 1), (False, True, True), 2, 1, 4, 4, 2),
    ((3, 3, 5), (2, 2, 4), (1, 1, 3), (1, 1, 1), (False, False, True), 2, 3, 3, 3, 2),
    ((3, 3, 12), (2, 2, 4), (1, 1, 3), (1, 1, 1), (False, False, True), 2, 3, 3, 3, 2),
    ((3, 4, 11), (2, 3, 2), (1, 1, 2), (1, 1, 1), (False, True, True), 2, 1, 4, 4, 2),
    ((7, 13), (4, 3), (2, 2), (1, 1), (False, False), 2, 1, 8, 2, 2),
    # (found by a randomized search to lose key-side sums when three rows were summed per pass)
    ((3, 10), (2, 4), (1, 1), (1, 1), (False, False), 2, 2, 16, 16, 3),
    ((7, 14), (3, 2), (2, 1), (1, 1), (False, True), 2, 1, 16, 16, 3),
]
VW = {"avx512": 16, "avx2": 8}.get(ext.simd(), 4)


def _ids(g):
    shape, K, s, d, c, Hkv, G, D, Dv, B = g
    return (
        f"L{'x'.join(map(str, shape))}-K{'x'.join(map(str, K))}-s{''.join(map(str, s))}"
        f"-d{''.join(map(str, d))}-c{''.join(str(int(x)) for x in c)}-kv{Hkv}G{G}D{D}v{Dv}B{B}"
    )


def _run(geo, seed, dtype=mx.float32):
    """out, lse, dq, dk, dv (float64 numpy), the inputs as the op saw them, kw, and the call's path counters"""
    shape, K, s, d, c, Hkv, G, D, Dv, B = geo
    return fused_vjp(ext, shape, K, s, d, c, Hkv, G, D, Dv, B, seed, dtype)


def _want(arrs, kw):
    q, k, v, cot, clse = arrs
    K, s, d, c = (tuple(kw[x]) for x in ("kernel_size", "stride", "dilation", "is_causal"))
    out, lse = oracle.na_forward(q, k, v, kernel_size=K, stride=s, dilation=d, is_causal=c)
    gr = oracle.na_backward(q, k, v, kernel_size=K, stride=s, dilation=d, is_causal=c, dout=cot, dlse=clse)
    return out, lse, gr["q"], gr["k"], gr["v"]


def _short(geo, vw):
    """whether the last-axis groups are shorter than vw queries and long enough for the exact path (AVX-512
    only, 5/8 of vw; every group: their lengths differ by at most one, checked on the shortest)"""
    L2, d2 = geo[0][-1], geo[3][-1]
    return vw >= 16 and L2 // d2 < vw and (L2 // d2) * 8 >= vw * 5


@pytest.mark.parametrize("geo", GEOS, ids=[_ids(g) for g in GEOS])
def test_short_groups_exact_path(geo, monkeypatch):
    monkeypatch.delenv("NATTEN_MLX_SHORT", raising=False)
    got, arrs, kw, counts = _run(geo, 5)
    B, H = geo[-1], geo[5] * geo[6]
    n = B * H * int(np.prod(geo[0]))
    if _short(geo, VW):
        assert counts[1] > 0 and counts[4] > 0, f"no border block served a query: {counts[:6]}"
        # (stride along the last axis can leave a query to the tiles, as in longer groups)
        if geo[2][-1] == 1:
            assert counts[2] == 0 and counts[5] == 0, f"tiles served queries: {counts[:6]}"
            assert counts[0] + counts[1] == n and counts[3] + counts[4] == n, counts[:6]
    for g_, w, what in zip(got, _want(arrs, kw), ("out", "lse", "dq", "dk", "dv")):
        assert_close(g_, w, 3e-5, what)


@pytest.mark.parametrize("geo", GEOS[:4] + GEOS[7:8], ids=[_ids(g) for g in GEOS[:4] + GEOS[7:8]])
def test_short_groups_tile_path_when_off(geo, monkeypatch):
    monkeypatch.setenv("NATTEN_MLX_SHORT", "0")
    got, arrs, kw, counts = _run(geo, 6)
    if _short(geo, VW):
        assert counts[2] > 0 and counts[5] > 0, f"no tile served a query: {counts[:6]}"
    for g_, w, what in zip(got, _want(arrs, kw), ("out", "lse", "dq", "dk", "dv")):
        assert_close(g_, w, 3e-5, what)


@pytest.mark.parametrize("geo", [GEOS[0], GEOS[2], GEOS[7]], ids=[_ids(g) for g in (GEOS[0], GEOS[2], GEOS[7])])
def test_short_groups_float16(geo, monkeypatch):
    monkeypatch.delenv("NATTEN_MLX_SHORT", raising=False)
    got, arrs, kw, _ = _run(geo, 8, dtype=mx.float16)
    for g_, w, what, tol in zip(got, _want(arrs, kw), ("out", "lse", "dq", "dk", "dv"), (3e-3, 1e-4, 3e-2, 3e-2, 3e-2)):
        assert_close(g_, w, tol, what)


def test_short_groups_nonfinite_values(monkeypatch):
    """an inf in v (border blocks need finite values: the call runs again without them): exactly the
    queries whose windows hold that key get a non-finite output in its channel, the rest are the float64
    oracle's (the oracle multiplies the inf by 0 elsewhere, so it is compared where it is finite); the
    tile path (NATTEN_MLX_SHORT=0) gives the same"""
    geo = GEOS[0]
    shape, K, s, d, c, Hkv, G, D, Dv, B = geo
    rng = np.random.default_rng(9)
    q = rng.standard_normal((B, *shape, Hkv * G, D)).astype(np.float32)
    k = rng.standard_normal((B, *shape, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, *shape, Hkv, Dv)).astype(np.float32)
    v[0, 3, 5, 1, 2] = np.inf
    kw = dict(kernel_size=list(K), stride=list(s), dilation=list(d), is_causal=list(c))
    holds = oracle.na_mask(shape, K)[:, 3 * shape[1] + 5].reshape(shape)  # queries whose window holds the key
    vv = v.copy()
    vv[0, 3, 5, 1, 2] = 0.0
    want, _ = oracle.na_forward(q.astype(np.float64), k.astype(np.float64), vv.astype(np.float64), kernel_size=K)
    outs = []
    for short in ("1", "0"):
        monkeypatch.setenv("NATTEN_MLX_SHORT", short)
        out = np.array(ext.fused_forward(mx.array(q), mx.array(k), mx.array(v), **kw)[0], np.float64)
        bad = ~np.isfinite(out)
        assert np.array_equal(bad[0, ..., 1, 2], holds), short
        bad[0, ..., 1, 2] = False
        assert not bad.any(), short
        ok = np.isfinite(out)
        assert_close(out[ok], want[ok], 3e-5, "out")
        outs.append(out)
    assert np.array_equal(np.isfinite(outs[0]), np.isfinite(outs[1]))
