"""Tiles whose every query's window is the whole key box (DiNAT's dilation groups of exactly K tokens, NAT's
K x K maps): since session 24 their softmax skips the per-column window test (kt.full_softmax in the forward,
kt.full_p_ds in the backward, which also takes dO . O as sum P dP instead of reading the outputs).

Here, on such geometries (2D dilated groups, a K x K map with GQA and D != Dv, a 3D box, rpb, extra keys and
values, batch 2, float16) the path counters say the whole-box kernels served every query forward and backward,
and out, lse and the gradients of q, k, v (rpb, extra keys and values) match the float64 oracle
(tests/oracle.py) with output and lse cotangents; geometries whose windows are not the whole box (a 9 x 9 map
at K = 7, causal) keep the masked kernels (counters zero) and match too; a NaN query reaches exactly the
outputs and gradients the oracle's NaN reaches.
"""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import oracle
import pytest
from nb_checks import assert_close

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)
ext = nb.extension()

# (shape, kernel, dilation, causal, Hkv, G, D, Dv, B, E, rpb, whole box)
GEOS = [
    ((14, 14), (7, 7), (2, 2), (False, False), 2, 1, 32, 32, 1, 0, False, True),  # DiNAT s3: groups of 7 x 7
    ((21, 14), (7, 7), (3, 2), (False, False), 1, 1, 16, 16, 2, 0, False, True),  # other dilations, batch 2
    ((7, 7), (7, 7), (1, 1), (False, False), 2, 2, 16, 24, 1, 0, False, True),  # NAT's 7 x 7, GQA, D != Dv
    ((12, 10), (6, 5), (2, 2), (False, False), 1, 2, 8, 8, 1, 0, True, True),  # even kernel, rpb
    ((7, 7), (7, 7), (1, 1), (False, False), 2, 1, 16, 16, 1, 3, False, True),  # extra keys and values
    ((3, 4, 5), (3, 4, 5), (1, 1, 1), (False, False, False), 1, 1, 8, 8, 1, 0, True, True),  # 3D box, rpb
    ((9, 9), (7, 7), (1, 1), (False, False), 2, 1, 16, 16, 1, 0, False, False),  # windows inside the box
    ((7, 7), (7, 7), (1, 1), (True, False), 1, 1, 16, 16, 1, 0, False, False),  # causal: not the whole box
]


def _id(g):
    shape, K, d, c, Hkv, G, D, Dv, B, E, rpb, _ = g
    return (
        f"L{'x'.join(map(str, shape))}-K{'x'.join(map(str, K))}-d{''.join(map(str, d))}"
        f"-c{''.join(str(int(x)) for x in c)}-kv{Hkv}G{G}D{D}v{Dv}B{B}E{E}{'-rpb' if rpb else ''}"
    )


def _inputs(geo, seed, nan_query=False):
    shape, K, d, c, Hkv, G, D, Dv, B, E, rpb, _ = geo
    H = Hkv * G
    rng = np.random.default_rng(seed)
    x = {
        "q": rng.standard_normal((B, *shape, H, D)),
        "k": rng.standard_normal((B, *shape, Hkv, D)),
        "v": rng.standard_normal((B, *shape, Hkv, Dv)),
        "ak": rng.standard_normal((B, E, Hkv, D)) if E else None,
        "av": rng.standard_normal((B, E, Hkv, Dv)) if E else None,
        "rpb": rng.standard_normal((H, *[2 * k - 1 for k in K])) if rpb else None,
        "cot": rng.standard_normal((B, *shape, H, Dv)),
        "clse": rng.standard_normal((B, *shape, H)),
    }
    if nan_query:
        x["q"][(0,) * (1 + len(shape)) + (0, 1)] = np.nan
    return x


def _run(geo, x, dtype=mx.float32):
    """out, lse and the gradients the op returns (float64), the inputs as the op saw them, the path counters"""
    shape, K, d, c = geo[:4]
    names = [n for n in ("q", "k", "v", "ak", "av", "rpb") if x[n] is not None]
    xs = {n: mx.array(x[n].astype(np.float32)).astype(dtype) for n in names + ["cot"]}
    xs["clse"] = mx.array(x["clse"].astype(np.float32))
    kw = dict(kernel_size=list(K), stride=[1] * len(shape), dilation=list(d), is_causal=list(c))

    def f(*args):
        a = dict(zip(names, args))
        return ext.fused_forward(a["q"], a["k"], a["v"], a.get("ak"), a.get("av"), a.get("rpb"), **kw)

    ext.path_counts(True)
    outs, grads = mx.vjp(f, [xs[n] for n in names], [xs["cot"], xs["clse"]])
    mx.eval(outs, grads)
    counts = ext.path_counts(True)
    got = dict(zip(["out", "lse"] + names, [np.array(t.astype(mx.float32), np.float64) for t in (*outs, *grads)]))
    seen = {n: np.array(v.astype(mx.float32), np.float64) for n, v in xs.items()}
    return got, seen, counts


def _want(geo, s):
    shape, K, d, c = geo[:4]
    win = dict(kernel_size=K, stride=1, dilation=d, is_causal=c)
    extra = dict(additional_keys=s.get("ak"), additional_values=s.get("av"), rpb=s.get("rpb"))
    out, lse = oracle.na_forward(s["q"], s["k"], s["v"], **win, **extra)
    gr = oracle.na_backward(s["q"], s["k"], s["v"], **win, **extra, dout=s["cot"], dlse=s["clse"])
    want = {"out": out, "lse": lse, "q": gr["q"], "k": gr["k"], "v": gr["v"]}
    if "ak" in s:
        want["ak"], want["av"] = gr["additional_keys"], gr["additional_values"]
    if "rpb" in s:
        want["rpb"] = gr["rpb"]
    return want


def _queries(geo):
    shape, _, _, _, Hkv, G, _, _, B = geo[:9]
    return B * int(np.prod(shape)) * Hkv * G


@pytest.mark.parametrize("geo", GEOS, ids=[_id(g) for g in GEOS])
def test_whole_box_tiles(geo, monkeypatch):
    # the tiles serve these (short groups on the exact path off: NATTEN_MLX_SHORT=0; extra keys always tiles)
    monkeypatch.setenv("NATTEN_MLX_EXACT", "0")
    got, seen, counts = _run(geo, _inputs(geo, 5))
    whole = geo[-1]
    assert counts[12] == (_queries(geo) if whole else 0), counts
    assert counts[13] == (_queries(geo) if whole else 0), counts
    want = _want(geo, seen)
    for name, w in want.items():
        assert_close(got[name], w, 3e-5, name)


def test_whole_box_tiles_float16(monkeypatch):
    monkeypatch.setenv("NATTEN_MLX_EXACT", "0")
    geo = GEOS[2]
    got, seen, counts = _run(geo, _inputs(geo, 6), dtype=mx.float16)
    assert counts[12] == counts[13] == _queries(geo), counts
    tol = {"out": 3e-3, "lse": 1e-4}
    for name, w in _want(geo, seen).items():
        assert_close(got[name], w, tol.get(name, 3e-2), name)


@pytest.mark.parametrize("geo", [GEOS[0], GEOS[4]], ids=[_id(GEOS[0]), _id(GEOS[4])])
def test_whole_box_tiles_nan_query(geo, monkeypatch):
    # one feature of one query (first token, head 0) NaN: by the definition that query's out, lse and dq are
    # NaN, and so are dk / dv of the keys in its window (here its whole dilation group) and of the extra keys
    # and values, for its kv head; everything else is what clean inputs give
    monkeypatch.setenv("NATTEN_MLX_EXACT", "0")
    shape, K, d, c = geo[:4]
    x = _inputs(geo, 7)
    got, seen, counts = _run(geo, {**x, "q": np.where(_nan_at(x["q"]), np.nan, x["q"])})
    assert counts[12] == counts[13] == _queries(geo), counts
    # every value not marked below is independent of the NaN query's q: the clean inputs' oracle
    want = _want(geo, {**seen, "q": x["q"].astype(np.float32).astype(np.float64)})
    window = oracle.na_mask(shape, K, 1, d, c)[0].reshape(shape)  # keys of query token 0
    for name in want:
        bad = np.zeros(want[name].shape, bool)
        if name in ("out", "lse", "q"):
            bad[(0,) * (1 + len(shape)) + (0,)] = True
        elif name in ("k", "v"):
            bad[0][window, 0] = True
        elif name in ("ak", "av"):
            bad[0, :, 0] = True
        np.testing.assert_array_equal(np.isnan(got[name]), bad, err_msg=name)
        assert_close(np.where(bad, 0.0, got[name]), np.where(bad, 0.0, want[name]), 3e-5, name)


def _nan_at(q):
    m = np.zeros(q.shape, bool)
    m[(0,) * (q.ndim - 2) + (0, 1)] = True
    return m


STORE_GEOS = [
    ((14, 14), (7, 7), (2, 2), (False, False), 8, 1, 16, 16, 2, 0, False, True),  # DiNAT-style groups of 7
    ((7, 7), (7, 7), (1, 1), (False, False), 8, 1, 8, 8, 2, 2, True, True),  # NAT's 7 x 7, extra KV, rpb
]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("geo", STORE_GEOS, ids=[_id(g) for g in STORE_GEOS])
def test_whole_group_tiles_store_every_key(geo, dtype, monkeypatch):
    # whole-group tiles with one task per slice (16 slices): the tiles store dk / dv (path counter 14) instead
    # of adding to zeroed gradients (the extra keys' still add). On output buffers kept from an earlier call
    # and set to NaN (pool_poison), a key no tile stored would stay NaN
    monkeypatch.setenv("NATTEN_MLX_EXACT", "0")
    monkeypatch.setenv("NATTEN_MLX_POOL_MB", "1024")
    x = _inputs(geo, 8)
    _run(geo, x, dtype)
    gc.collect()
    ext.pool_poison()
    got, seen, counts = _run(geo, x, dtype)
    slices = geo[4] * geo[8]
    if 4 * ext.num_threads() <= slices:  # (more threads split a slice's tiles among tasks: no stores)
        assert counts[14] == 1, counts
    tol = 3e-5 if dtype == mx.float32 else 3e-2
    for name, w in _want(geo, seen).items():
        assert_close(got[name], w, tol, name)
