"""The streamed 2D/3D forward's P.V from heads-last value rows (exact_fwd2r, the default where the AVX-512
kernels run and Dv is a multiple of 16) against the float64 oracle, and against the same forward on
transposed values (NATTEN_MLX_PVROWS=0, read on every call), which it matches bit for bit: each lane's
sums run over the same key rows and slots in the same order.

Geometries stream (at least two slices per kernel thread) and vary what the lanes of a block look like
to the P.V: runs (one band of 16 lanes), border blocks whose clamped lanes share a window (a band and a
group), causal windows along the last axis (lanes holding fewer keys: lane by lane), dilation (several
last-axis groups), even kernels, GQA, value widths of one to four vectors (passes of two and one), 3D;
and a value width the path does not serve (the counters show which path ran). Values that are not
finite are multiplied by no weight outside their windows, so border blocks serve them in one round.
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

TOL = {mx.float32: 2e-5, mx.float16: 4e-3}
# enough batches for two slices per kernel thread (the streamed path)
NTHR = ext.num_threads()

# (shape, kernel, stride, dilation, causal, Hkv, G, D, Dv)
GEOS = [
    ((9, 40), (3, 5), (1, 1), (1, 1), (False, False), 2, 1, 16, 16),
    ((12, 48), (5, 7), (1, 1), (2, 3), (False, False), 2, 2, 8, 32),
    ((10, 44), (3, 5), (1, 1), (1, 1), (True, False), 1, 3, 8, 16),
    ((10, 44), (3, 5), (1, 1), (1, 2), (False, True), 2, 1, 16, 48),
    ((6, 60), (3, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 64),
    ((5, 70), (3, 8), (1, 1), (1, 1), (False, False), 2, 2, 8, 32),
    ((4, 150), (3, 13), (1, 1), (1, 3), (False, False), 2, 1, 8, 32),
    ((8, 64), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32),
    ((6, 7, 40), (3, 3, 5), (1, 1, 1), (1, 2, 1), (False, True, False), 2, 2, 8, 16),
    ((7, 6, 36), (3, 4, 7), (1, 2, 1), (2, 1, 2), (True, False, False), 1, 1, 16, 32),
    ((9, 40), (3, 5), (1, 1), (1, 1), (False, False), 2, 1, 16, 12),
]


def _ids(g):
    shape, K, s, d, c, Hkv, G, D, Dv = g
    return (f"L{'x'.join(map(str, shape))}-K{'x'.join(map(str, K))}-s{''.join(map(str, s))}"
            f"-d{''.join(map(str, d))}-c{''.join(str(int(x)) for x in c)}-kv{Hkv}G{G}D{D}v{Dv}")


def _served(geo):
    """Whether exact_fwd2r serves the geometry on this machine."""
    return ext.simd() == "avx512" and geo[-1] % 16 == 0


def _run(geo, dtype, seed, vals=None):
    shape, K, s, d, c, Hkv, G, D, Dv = geo
    B = max(1, -(-2 * NTHR // Hkv))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, *shape, Hkv * G, D))
    k = rng.standard_normal((B, *shape, Hkv, D))
    v = rng.standard_normal((B, *shape, Hkv, Dv)) if vals is None else vals(B)
    kw = dict(kernel_size=list(K), stride=list(s), dilation=list(d), is_causal=list(c), scale=None)
    args = [mx.array(x.astype(np.float32)).astype(dtype) for x in (q, k, v)]
    ext.path_counts(True)
    out, lse = ext.fused_forward(*args, None, None, None, **kw)
    mx.eval(out, lse)
    counts = ext.path_counts(True)
    qkv = [np.array(a.astype(mx.float32), np.float64) for a in args]
    return qkv, kw, np.array(out.astype(mx.float32), np.float64), np.array(lse, np.float64), counts


@pytest.mark.parametrize("geo", GEOS, ids=[_ids(g) for g in GEOS])
def test_pvrows_bits_equal_transposed_values(geo, monkeypatch):
    monkeypatch.setenv("NATTEN_MLX_PVROWS", "1")
    _, _, out1, lse1, c1 = _run(geo, mx.float32, 5)
    monkeypatch.setenv("NATTEN_MLX_PVROWS", "0")
    _, _, out0, lse0, c0 = _run(geo, mx.float32, 5)
    assert c1[0] + c1[1] > 0, "the exact path served no query"
    assert c1[:3] == c0[:3]
    assert c1[9] == (1 if _served(geo) else 0), f"exact_fwd2r ran {c1[9]} times"
    assert c0[9] == 0, "NATTEN_MLX_PVROWS=0 still read value rows"
    assert np.array_equal(out1, out0), f"out differs by {np.abs(out1 - out0).max():.3g}"
    assert np.array_equal(lse1, lse0), f"lse differs by {np.abs(lse1 - lse0).max():.3g}"


@pytest.mark.parametrize("geo", GEOS, ids=[_ids(g) for g in GEOS])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["f32", "f16"])
def test_pvrows_forward_against_oracle(geo, dtype):
    (q, k, v), kw, out, lse, counts = _run(geo, dtype, 11)
    assert counts[9] == (1 if _served(geo) else 0)
    want_out, want_lse = oracle.na_forward(q, k, v, kernel_size=tuple(kw["kernel_size"]), stride=tuple(kw["stride"]),
                                           dilation=tuple(kw["dilation"]), is_causal=tuple(kw["is_causal"]))
    for got, want, what in ((out, want_out, "out"), (lse, want_lse, "lse")):
        assert_close(got, want, TOL[dtype], what)


@pytest.mark.parametrize("bad_value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("bad", [(2, 1), (4, 42), (5, 20)], ids=["left-border", "right-border", "run"])
def test_pvrows_nonfinite_value_stays_in_its_windows(bad, bad_value):
    """A value that is not finite reaches exactly the queries whose windows hold it, every other query
    equals the oracle with that value zeroed, and the exact path (border blocks included) serves every
    query in one round (the transposed values' path checks them and runs again without border blocks)."""
    geo = ((8, 44), (3, 7), (1, 1), (1, 1), (False, False), 2, 1, 8, 16)
    if not _served(geo):
        pytest.skip("exact_fwd2r needs the AVX-512 kernels")
    shape, K = geo[0], geo[1]
    vals = {}

    def make(B):
        v = np.random.default_rng(3).standard_normal((B, *shape, 2, 16))
        vals["v"] = v.copy()
        v[(0, *bad, 1, 3)] = bad_value
        return v

    (q, k, _), kw, out, _, counts = _run(geo, mx.float32, 3, vals=make)
    B = q.shape[0]
    assert counts[9] == 1 and counts[2] == 0 and counts[1] > 0
    assert counts[0] + counts[1] == B * 2 * int(np.prod(shape))
    v_zero = vals["v"].copy()
    v_zero[(0, *bad, 1)] = 0.0
    want, _ = oracle.na_forward(q, k, v_zero, kernel_size=K, stride=(1, 1), dilation=(1, 1), is_causal=(False, False))
    # the queries whose windows hold the bad token
    sees = oracle.na_mask(shape, K)[:, np.ravel_multi_index(bad, shape)].reshape(shape)
    assert sees.any() and not sees.all()
    head = out[0, ..., 1, :]  # query head 1 reads kv head 1 (G = 1)
    assert np.all(np.isfinite(head[~sees])), "a value that is not finite leaked outside its windows"
    assert not np.any(np.isfinite(head[sees][..., 3])), "a query whose window holds the value stayed finite"
    assert np.all(np.isfinite(np.delete(out[0], 1, axis=-2))), "another head saw the value"
    assert np.all(np.isfinite(out[1:])), "another batch saw the value"
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(head[~sees] - want[0, ..., 1, :][~sees]).max() <= 2e-5 * scale
    assert np.abs(out[0, ..., 0, :] - want[0, ..., 0, :]).max() <= 2e-5 * scale
