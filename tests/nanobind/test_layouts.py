"""Layouts and dtypes at the C++ boundary: float16 / bfloat16 inputs and outputs, strided views (slices of a
fused qkv projection, heads-first arrays seen heads-last, a strided feature axis) and broadcast output
gradients give the bits of the float32 op on contiguous inputs.

The kernels compute in float32, so a float16 call must equal the float32 op on the inputs converted with
MLX's astype, its outputs converted back with astype, bit for bit (the kernel tables convert rows with
F16C and integer rounding instead of MLX's types: kernels.cpp; benchmarks/nanobind/half_harness.cpp checks
them on all 2^32 float32 values). Views are gathered into heads-last rows per token, where the whole
token's heads are one row when the view allows it (a qkv slice): the same bits as a contiguous copy.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from nb_checks import assert_close

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)
ext = nb.extension()

# (spatial, H, H_kv, D, Dv, kernel, stride, dilation, causal, extra, rpb)
GEOS = [
    ((20, 24), 4, 4, 32, 32, (7, 7), (1, 1), (1, 1), (False, False), 0, False),
    ((9, 10, 12), 2, 2, 16, 16, (3, 5, 5), (1, 2, 1), (2, 1, 1), (True, False, False), 0, False),
    ((300,), 4, 2, 20, 36, (9,), (2,), (3,), (True,), 0, False),
    ((13, 17), 4, 2, 12, 5, (4, 6), (1, 1), (2, 1), (False, True), 3, False),
    ((16, 16), 3, 3, 32, 32, (5, 5), (1, 1), (1, 1), (False, False), 0, True),
]
IDS = [f"{len(g[0])}d-{i}" for i, g in enumerate(GEOS)]


def _bits(x):
    return np.array(x.view(mx.uint32 if x.dtype == mx.float32 else mx.uint16))


def _inputs(geo, seed, dtype, nan=False):
    spatial, h, hkv, d, dv, kern, stride, dil, causal, extra, rpb = geo
    rng = np.random.default_rng(seed)

    def arr(*s):
        return mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)

    q, k, v = arr(1, *spatial, h, d), arr(1, *spatial, hkv, d), arr(1, *spatial, hkv, dv)
    if nan:
        vn = np.array(v.astype(mx.float32))
        vn.reshape(-1)[vn.size // 3] = np.nan
        vn.reshape(-1)[vn.size // 2] = -np.inf
        v = mx.array(vn).astype(dtype)
    ek = arr(1, extra, hkv, d) if extra else None
    ev = arr(1, extra, hkv, dv) if extra else None
    rb = arr(h, *[2 * kk - 1 for kk in kern]) if rpb else None
    kw = dict(kernel_size=kern, stride=stride, dilation=dil, is_causal=causal)
    cot, clse = arr(1, *spatial, h, dv), mx.array(rng.standard_normal((1, *spatial, h)).astype(np.float32))
    return (q, k, v), (ek, ev, rb), kw, (cot, clse)


def _vjp(prim, side, kw, cots):
    ek, ev, rb = side
    (out, lse), grads = mx.vjp(lambda a, b, c: ext.fused_forward(a, b, c, ek, ev, rb, **kw), list(prim), list(cots))
    mx.eval(out, lse, *grads)
    return [out, lse, *grads]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("geo", GEOS, ids=IDS)
@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan-inf"])
def test_half_dtypes_are_the_float32_op_converted(geo, dtype, nan):
    prim, side, kw, cots = _inputs(geo, 7, dtype, nan)
    got = _vjp(prim, side, kw, cots)
    f32 = lambda x: None if x is None else x.astype(mx.float32)  # noqa: E731
    want = _vjp([f32(x) for x in prim], [f32(x) for x in side], kw, [f32(cots[0]), cots[1]])
    # the backward reads the forward's output where its border tiles need dO . O: in a float16 call that is
    # the rounded output, so the gradients are the float32 op's bit for bit only where no tile runs (the
    # exact paths of geometries 0 and 2, finite inputs), and close elsewhere
    exact = not nan and geo in (GEOS[0], GEOS[2])
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        w = w if name == "lse" else w.astype(dtype)
        assert g.dtype == w.dtype, name
        if name in ("out", "lse") or exact:
            assert np.array_equal(_bits(g), _bits(w)), (name, int((_bits(g) != _bits(w)).sum()))
        else:
            gf, wf = (np.array(x.astype(mx.float32)) for x in (g, w))
            fin = np.isfinite(wf)
            assert np.array_equal(fin, np.isfinite(gf)), name
            assert_close(gf[fin], wf[fin], 2e-2 if dtype == mx.bfloat16 else 3e-3, name)
    if nan:
        o = np.array(got[0].astype(mx.float32))
        assert np.isnan(o).any() and np.isfinite(o).any()


def test_every_finite_half_value_converts_exactly():
    # 1D, kernel 2, q = k = 0: odd query 2j + 1 attends to keys 2j and 2j + 1 with equal weights, and both
    # value rows hold the same 32 values: its output is those values exactly, whatever the arithmetic
    h = np.arange(1 << 16, dtype=np.uint16)
    f16 = h.view(np.float16)
    bf = (h.astype(np.uint32) << 16).view(np.float32)
    for dtype, vals in ((mx.float16, f16[np.isfinite(f16)]), (mx.bfloat16, bf[np.isfinite(bf) & (np.abs(bf) < 1e38)])):
        vals = vals[(vals != 0) | ~np.signbit(vals)]  # -0 + -0 accumulates from +0: +0
        vals = vals[: vals.size - vals.size % 32]
        x = mx.array(vals.astype(np.float32)).astype(dtype) if dtype == mx.bfloat16 else mx.array(vals)
        rows = x.reshape(-1, 1, 32)
        v = mx.concatenate([rows, rows], axis=1).reshape(1, -1, 1, 32)
        q = mx.zeros(v.shape, dtype=dtype)
        kw = dict(kernel_size=[2], stride=[1], dilation=[1], is_causal=[False])
        out, _ = ext.fused_forward(q, q, v, **kw)
        assert np.array_equal(_bits(out)[0, 1::2, 0], _bits(x).reshape(-1, 32))
        ref, _ = ext.fused_forward(q.astype(mx.float32), q.astype(mx.float32), v.astype(mx.float32), **kw)
        assert np.array_equal(_bits(out), _bits(ref.astype(dtype)))


def _views(kind, geo, dtype, seed=3):
    """(view inputs, contiguous copies): q, k, v and the output gradient."""
    spatial, h, hkv, d, dv = geo[:5]
    rng = np.random.default_rng(seed)

    def arr(*s):
        return mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)

    n = len(spatial)
    if kind == "qkv":  # slices of one fused [B, *spatial, 3, H, D] projection
        qkv = arr(1, *spatial, 3, h, d)
        views = [qkv[..., i, :, :] for i in range(3)]
        cot = mx.broadcast_to(arr(1, 1, d), (1, *spatial, h, d))
    elif kind == "heads-first":  # [B, H, *spatial, D] arrays seen heads-last
        views = [
            arr(1, hh, *spatial, w).transpose(0, *range(2, n + 2), 1, n + 2) for hh, w in ((h, d), (hkv, d), (hkv, dv))
        ]
        cot = arr(1, h, *spatial, dv).transpose(0, *range(2, n + 2), 1, n + 2)
    else:  # every other feature of wider rows, a broadcast head, and one value broadcast (mx.sum's gradient)
        views = [
            arr(1, *spatial, h, 2 * d)[..., ::2],
            mx.broadcast_to(arr(1, *spatial, 1, d), (1, *spatial, hkv, d)),
            arr(1, *spatial, hkv, 2 * dv)[..., 1::2],
        ]
        cot = mx.broadcast_to(arr(1), (1, *spatial, h, dv))
    return views + [cot], [mx.contiguous(x) for x in views + [cot]]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("kind", ["qkv", "heads-first", "strided"])
@pytest.mark.parametrize("geo", [GEOS[0], GEOS[1], GEOS[2]], ids=IDS[:3])
def test_views_give_the_bits_of_contiguous_inputs(geo, kind, dtype):
    if kind == "qkv" and (geo[1] != geo[2] or geo[3] != geo[4]):
        geo = (geo[0], geo[1], geo[1], geo[3], geo[3]) + geo[5:]
    kw = dict(kernel_size=geo[5], stride=geo[6], dilation=geo[7], is_causal=geo[8])
    views, copies = _views(kind, geo, dtype)
    clse = mx.zeros(views[0].shape[:-1])
    got = _vjp(views[:3], (None, None, None), kw, [views[3], clse])
    want = _vjp(copies[:3], (None, None, None), kw, [copies[3], clse])
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert np.array_equal(_bits(g), _bits(w)), name
