"""Output buffers kept for reuse (NATTEN_MLX_POOL_MB, read on every call; CPU-only MLX builds).

MLX's CPU-only allocator is malloc, and glibc gives large freed blocks back to the system, so every call's
outputs were fresh pages faulted in by the kernels' first stores. The tier now keeps output buffers of 64 KiB
or more when their arrays die and hands them to the next output of the same size. A kept buffer holds the
previous call's values, so every kernel must write every value of its outputs: here the pool is filled with
one call's output buffers, set to NaN (pool_poison), and a second call of the same shapes must take those buffers
(the pool shrinks by their size) and give the bits of the same call with the pool off (fresh buffers),
for the fused forward and backward on each path (exact-window runs and border blocks, tiles, 1D rows and
transposed copies, 3D, rpb, extra keys/values, GQA, D != Dv, float16 and bfloat16 outputs converted from
scratch) and for the split ops and their gradients. Then the cap: outputs over it are not kept, 0 keeps none,
pool_clear() frees what is kept, and arrays that outlive a donation still give their buffers back.
"""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from nb_checks import geo_id

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)
ext = nb.extension()
if mx.is_available(mx.gpu):
    pytest.skip("GPU MLX builds cache buffers in their own allocator; the pool is off there", allow_module_level=True)

# (shape, kernel, stride, dilation, causal, Hkv, G, D, Dv, extra, rpb, env)
GEOS = [
    ((24, 48), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32, 0, False, {}),
    ((20, 40), (5, 7), (1, 1), (2, 1), (False, False), 2, 2, 16, 48, 0, True, {}),
    ((16, 40), (3, 5), (2, 1), (1, 1), (False, False), 2, 1, 16, 16, 0, False, {}),
    ((18, 36), (4, 6), (1, 1), (1, 1), (True, False), 2, 1, 32, 16, 3, False, {}),
    ((14, 14), (7, 7), (1, 1), (2, 2), (False, False), 4, 1, 32, 32, 0, False, {}),
    ((6, 8, 64), (3, 3, 5), (1, 1, 1), (1, 1, 2), (False, False, True), 2, 1, 32, 32, 0, False, {}),
    ((2048,), (9,), (1,), (1,), (False,), 4, 1, 32, 32, 0, False, {}),
    ((2048,), (9,), (1,), (1,), (False,), 4, 1, 32, 32, 0, False, {"NATTEN_MLX_ROW1D": "0"}),
]


def _ids(g):
    return geo_id(g)


def _inputs(geo, B, seed, dtype=mx.float32):
    shape, K, s, d, c, Hkv, G, D, Dv, E, rpb, _ = geo
    rng = np.random.default_rng(seed)
    shapes = [(B, *shape, Hkv * G, D), (B, *shape, Hkv, D), (B, *shape, Hkv, Dv), (B, *shape, Hkv * G, Dv)]
    if E:
        shapes += [(B, E, Hkv, D), (B, E, Hkv, Dv)]
    arrs = [rng.standard_normal(sh) for sh in shapes]
    xs = [mx.array(x.astype(np.float32)).astype(dtype) for x in arrs]
    bias = mx.array(rng.standard_normal((Hkv * G, *[2 * k - 1 for k in K])).astype(np.float32)) if rpb else None
    return xs, bias


def _fused(geo, xs, bias):
    _, K, s, d, c, *_ = geo
    kw = dict(kernel_size=list(K), stride=list(s), dilation=list(d), is_causal=list(c))
    prim = xs[:3] + xs[4:6] if len(xs) == 6 else xs[:3]

    def f(*a):
        q, k, v, *ex = a
        ek, ev = ex if ex else (None, None)
        return ext.fused_forward(q, k, v, ek, ev, bias, **kw)

    lse_cot = mx.ones(xs[0].shape[:-1])
    outs, grads = mx.vjp(f, prim, [xs[3], lse_cot])
    mx.eval(outs, grads)
    return [*outs, *grads]


def _nbytes(arrs):
    return sum(a.nbytes for a in arrs if a.nbytes + 64 >= 1 << 16)


def _np(x):
    return np.array(x.astype(mx.float32))  # exact for float16 / bfloat16


def _on_poisoned_buffers(run, first_args, args, monkeypatch):
    """run(*first_args) leaves its outputs' buffers in the pool, which pool_poison() fills with NaN; run(*args)
    must take them and give the bits of the same call with the pool off."""
    monkeypatch.setenv("NATTEN_MLX_POOL_MB", "0")
    want = [_np(x) for x in run(*args)]
    monkeypatch.setenv("NATTEN_MLX_POOL_MB", "1024")
    ext.pool_clear()
    first = run(*first_args)
    kept = _nbytes(first)
    del first
    gc.collect()
    ext.pool_poison()
    before = ext.pool_bytes()
    assert before >= kept > 0, (before, kept)
    got = run(*args)
    assert before - ext.pool_bytes() >= _nbytes(got), "the call did not take the kept buffers"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.isfinite(_np(g)).sum() == np.isfinite(w).sum(), f"output {i}: NaN left from a kept buffer"
        assert np.array_equal(_np(g), w), f"output {i} differs from the call on fresh buffers"


FUSED = [(g, mx.float32) for g in GEOS] + [(g, t) for g in (GEOS[0], GEOS[5]) for t in (mx.float16, mx.bfloat16)]


@pytest.mark.parametrize(("geo", "dtype"), FUSED, ids=[f"{_ids(g)}-{str(t)[9:]}" for g, t in FUSED])
def test_fused_outputs_fully_written_on_kept_buffers(geo, dtype, monkeypatch):
    for k, v in geo[-1].items():
        monkeypatch.setenv(k, v)
    B = 2
    first = _inputs(geo, B, 0, dtype=dtype)
    args = _inputs(geo, B, 1, dtype=dtype)
    _on_poisoned_buffers(lambda xs, bias: _fused(geo, xs, bias), first, args, monkeypatch)


@pytest.mark.parametrize("geo", [GEOS[1], GEOS[3], GEOS[5]], ids=_ids)
def test_split_ops_outputs_fully_written_on_kept_buffers(geo, monkeypatch):
    _, K, s, d, c, Hkv, G, D, Dv, E, rpb, _ = geo
    kw = dict(kernel_size=list(K), stride=list(s), dilation=list(d), is_causal=list(c))

    def run(xs, bias):
        q, k, v = xs[:3]
        ek, ev = (xs[4], xs[5]) if E else (None, None)
        ds = mx.ones((*q.shape[:-1], int(np.prod(K)) + E))
        scores, qk_grads = mx.vjp(lambda a, b: [ext.qk_forward(a, b, ek, bias, **kw)], [q, k], [ds])
        attn = mx.softmax(scores[0], axis=-1)
        out, av_grads = mx.vjp(lambda a, b: [ext.av_forward(a, b, ev, **kw)], [attn, v], [xs[3]])
        res = [scores[0], *qk_grads, out[0], *av_grads]
        mx.eval(res)
        return res

    _on_poisoned_buffers(run, _inputs(geo, 2, 0), _inputs(geo, 2, 1), monkeypatch)


def test_cap_and_clear(monkeypatch):
    geo = GEOS[0]
    xs, _ = _inputs(geo, 2, 3)
    q, k, v = xs[:3]
    kw = dict(kernel_size=[7, 7], stride=[1, 1], dilation=[1, 1], is_causal=[False, False])
    size = q.nbytes  # 2 x 24 x 48 x 4 x 32 floats: 1.1 MiB

    def call():
        out = ext.fused_forward(q, k, v, **kw)
        mx.eval(out)
        return out

    monkeypatch.setenv("NATTEN_MLX_POOL_MB", "1024")
    ext.pool_clear()
    assert ext.pool_bytes() == 0
    out = call()
    want = np.array(out[0])
    del out
    gc.collect()
    assert ext.pool_bytes() >= size
    # a donated output (y takes out's buffer) gives it back when y dies
    out = call()
    y = out[0] * 2.0
    del out
    mx.eval(y)
    assert np.array_equal(np.array(y), 2.0 * want)
    del y
    gc.collect()
    assert ext.pool_bytes() >= size
    ext.pool_clear()
    assert ext.pool_bytes() == 0
    monkeypatch.setenv("NATTEN_MLX_POOL_MB", "1")  # smaller than the output: not kept
    out = call()
    del out
    gc.collect()
    assert ext.pool_bytes() < size
    monkeypatch.setenv("NATTEN_MLX_POOL_MB", "0")
    out = call()
    assert np.array_equal(np.array(out[0]), want)
    del out
    gc.collect()
    assert ext.pool_bytes() == 0
    monkeypatch.setenv("NATTEN_MLX_POOL_MB", "1024")
    out = call()
    del out
    gc.collect()
    assert ext.pool_bytes() >= size
    monkeypatch.setenv("NATTEN_MLX_POOL_MB", "0")  # a lowered cap frees the kept buffers at the next release
    out = call()
    del out
    gc.collect()
    assert ext.pool_bytes() == 0
