"""q, k and v read in place as views whose tokens are evenly spaced (ops.cpp token_stride).

NAT-style modules pass q, k and v as slices of one fused projection, qkv.reshape(B, *spatial, 3, H, D)[..., i, :, :]:
each token's heads are contiguous, the tokens 3 H D floats apart. The fused forward and backward read such views
(and any float32 view whose tokens, batch and spatial axes flattened, are evenly spaced with each token's H x D
values contiguous) in place with that token stride instead of copying them first. Every path that reads q, k or v
is run on such views and must give the bits of the same call on contiguous copies (out, lse, dq, dk, dv, and the
rpb / extra key-value gradients): the exact path's runs and border blocks (streamed, whole slices, local chunks,
value rows and transposed values), short groups, the tiles (from transposed keys and from the heads-last rows of
whole-group tiles), 1D rows and 1D on transposed copies, NATTEN_MLX_ROW2D=1's rows, 3D, rpb, extra keys and
values, GQA (k and v slices of a kv projection), D != Dv, and the checked second pass that non-finite inputs take.
Views that are not evenly spaced (a window cut out of the spatial axes, heads not contiguous) are copied; the
same comparison covers them.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from nb_checks import geo_id

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)
ext = nb.extension()
NTHR = ext.num_threads()

# (shape, kernel, stride, dilation, causal, Hkv, G, D, Dv, E, rpb, env)
GEOS = [
    ((24, 48), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32, 0, False, {}),
    ((24, 48), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32, 0, False, {"NATTEN_MLX_PVROWS": "0"}),
    ((20, 40), (5, 7), (1, 1), (2, 1), (False, False), 2, 2, 16, 48, 0, True, {}),
    ((18, 36), (4, 6), (1, 1), (1, 1), (True, False), 2, 1, 32, 16, 0, False, {}),
    ((12, 96), (3, 5), (1, 1), (1, 3), (False, True), 2, 1, 16, 32, 0, False, {}),
    ((16, 40), (3, 5), (2, 1), (1, 1), (False, False), 2, 1, 16, 16, 0, False, {}),
    ((14, 14), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32, 0, False, {}),
    ((28, 28), (7, 7), (1, 1), (4, 4), (False, False), 2, 1, 32, 32, 0, False, {}),
    ((7, 7), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32, 0, True, {}),
    ((16, 32), (5, 5), (1, 1), (1, 1), (False, False), 2, 1, 32, 32, 3, False, {}),
    ((16, 32), (5, 5), (1, 1), (1, 1), (False, False), 2, 1, 32, 32, 0, False, {"NATTEN_MLX_ROW2D": "1"}),
    ((16, 32), (5, 5), (1, 1), (1, 1), (False, False), 2, 1, 32, 32, 0, False, {"NATTEN_MLX_EXACT": "0"}),
    ((6, 8, 64), (3, 3, 5), (1, 1, 1), (1, 1, 2), (False, False, True), 2, 1, 32, 32, 0, False, {}),
    ((1024,), (9,), (1,), (1,), (False,), 2, 1, 32, 32, 0, False, {}),
    ((1024,), (9,), (1,), (2,), (False,), 2, 2, 32, 16, 0, False, {"NATTEN_MLX_ROW1D": "0"}),
    ((512,), (7,), (1,), (1,), (False,), 4, 1, 32, 32, 0, True, {}),
]


def _ids(g):
    return geo_id(g)


def _views(kind, B, shape, H, Hkv, D, Dv, rng, inf_key=False):
    """q, k, v as views of the given kind (inf_key: qkv only, the first key's first value inf)"""
    r = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731

    def base(*s):  # the projection, with the key slot's first value inf when asked
        x = rng.standard_normal(s).astype(np.float32)
        if inf_key:
            x[(0,) * (len(s) - 3) + (1 if s[-3] == 3 else 0, 0, 0)] = np.inf
        return mx.array(x)

    if kind == "qkv":
        if Hkv == H and D == Dv:
            qkv = base(B, *shape, 3, H, D)
            return [qkv[..., i, :, :] for i in range(3)]
        # GQA / D != Dv: q alone, k and v slices of one kv projection (the wider feature axis cut for the other)
        W = max(D, Dv)
        kv = base(B, *shape, 2, Hkv, W)
        return [r(B, *shape, H, D), kv[..., 0, :, :D], kv[..., 1, :, :Dv]]
    if kind == "wide_heads":
        # heads of a wider array: the first H of 2H heads per token
        return [r(B, *shape, 2 * h, w)[..., :h, :] for h, w in ((H, D), (Hkv, D), (Hkv, Dv))]
    if kind == "last_axis_step":
        # every other token along the last spatial axis: tokens 2 H D apart, rows evenly spaced
        big = (*shape[:-1], 2 * shape[-1])
        return [r(B, *big, h, w)[..., ::2, :, :] for h, w in ((H, D), (Hkv, D), (Hkv, Dv))]
    if kind == "window":
        # a window cut out of larger spatial axes: rows not evenly spaced (copied)
        big = tuple(n + 2 for n in shape)
        idx = (slice(None), *(slice(1, 1 + n) for n in shape))
        return [r(B, *big, h, w)[idx] for h, w in ((H, D), (Hkv, D), (Hkv, Dv))]
    raise ValueError(kind)


def _call(geo, q, k, v, extra, bias, cot, clse):
    _, K, s, d, c, *_ = geo
    kw = dict(kernel_size=list(K), stride=list(s), dilation=list(d), is_causal=list(c))
    prim = [q, k, v, *extra] + ([bias] if bias is not None else [])

    def f(*a):
        qq, kk, vv, *ex = a
        rp = ex.pop() if bias is not None else None
        ek, ev = ex if ex else (None, None)
        return ext.fused_forward(qq, kk, vv, ek, ev, rp, **kw)

    outs, grads = mx.vjp(f, prim, [cot, clse])
    mx.eval(outs, grads)
    return [np.array(x) for x in (*outs, *grads)]


def _check(geo, kind, monkeypatch, nonfinite=False):
    shape, K, s, d, c, Hkv, G, D, Dv, E, rpb, env = geo
    for name, val in env.items():
        monkeypatch.setenv(name, val)
    H = Hkv * G
    B = max(2, -(-2 * NTHR // Hkv))  # two slices per kernel thread: the streamed path
    rng = np.random.default_rng(7)
    q, k, v = _views(kind, B, shape, H, Hkv, D, Dv, rng, inf_key=nonfinite)  # (inf: the checked second pass)
    if nonfinite:
        assert not np.isfinite(np.array(k)).all()
    extra = []
    if E:
        extra = [mx.array(rng.standard_normal((B, E, Hkv, w)).astype(np.float32)) for w in (D, Dv)]
    bias = mx.array(rng.standard_normal((H, *[2 * x - 1 for x in K])).astype(np.float32)) if rpb else None
    cot = mx.array(rng.standard_normal((B, *shape, H, Dv)).astype(np.float32))
    clse = mx.array(rng.standard_normal((B, *shape, H)).astype(np.float32))
    contiguous = [mx.array(np.array(x)) for x in (q, k, v)]
    want = _call(geo, *contiguous, extra, bias, cot, clse)
    ext.path_counts(True)
    got = _call(geo, q, k, v, extra, bias, cot, clse)
    in_place = ext.path_counts(True)[11]
    # the forward and the backward read the views in place, or copy them
    assert in_place == (0 if kind == "window" else 2), in_place
    names = ["out", "lse", "dq", "dk", "dv"] + (["dek", "dev"] if E else []) + (["drpb"] if rpb else [])
    for n, g_, w in zip(names, got, want, strict=True):
        assert np.array_equal(g_, w, equal_nan=True), f"{n} differs from the call on contiguous copies"
    if not nonfinite:
        assert np.isfinite(got[0]).all()


@pytest.mark.parametrize("geo", GEOS, ids=_ids)
@pytest.mark.parametrize("kind", ["qkv", "wide_heads", "last_axis_step"])
def test_strided_views_read_in_place_match_contiguous(geo, kind, monkeypatch):
    _check(geo, kind, monkeypatch)


@pytest.mark.parametrize("geo", [GEOS[0], GEOS[7], GEOS[13]], ids=_ids)
def test_uneven_views_copied_match_contiguous(geo, monkeypatch):
    _check(geo, "window", monkeypatch)


@pytest.mark.parametrize("geo", [GEOS[0], GEOS[6], GEOS[13], GEOS[14]], ids=_ids)
def test_nonfinite_key_in_a_view(geo, monkeypatch):
    _check(geo, "qkv", monkeypatch, nonfinite=True)
