"""The 2D/3D forward on heads-last rows (NATTEN_MLX_ROW2D=1: kt.row_fwd_g, a query's window gathered
as its K0 (x K1) last-axis key segments) against the float64 oracle, next to the default path
(transposed slices, exact_fwd2) on the same problems.

Geometries keep long enough runs along the last axis for the exact path to serve most queries (the
path counters check that it did), and vary what the segment offsets depend on: dilation (segments
Dl2 tokens apart, several last-axis groups), causal axes (fewer key rows for the first queries, short
causal segments in border blocks), stride, GQA (key head of each query head), Dv != D, odd head
counts (the kernel's single-query tail), long rows (many blocks, border blocks at both ends).
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

# (shape, kernel, stride, dilation, causal, B, H, Hkv, D, Dv)
GEOS = [
    ((9, 40), (3, 5), (1, 1), (1, 1), (False, False), 1, 2, 2, 16, 16),
    ((12, 48), (5, 7), (1, 1), (2, 3), (False, False), 2, 4, 2, 8, 12),
    ((10, 44), (3, 5), (1, 1), (1, 1), (True, False), 1, 3, 1, 8, 4),
    ((10, 44), (3, 5), (1, 1), (1, 2), (False, True), 1, 2, 1, 16, 8),
    ((11, 50), (4, 6), (2, 3), (1, 1), (False, False), 1, 2, 2, 8, 8),
    ((5, 300), (3, 7), (1, 1), (1, 1), (False, False), 1, 2, 2, 32, 32),
    ((6, 60), (3, 7), (1, 1), (1, 1), (False, False), 1, 3, 3, 32, 35),
    ((6, 7, 40), (3, 3, 5), (1, 1, 1), (1, 2, 1), (False, True, False), 1, 4, 2, 8, 16),
    ((7, 6, 36), (3, 4, 7), (1, 2, 1), (2, 1, 2), (True, False, False), 2, 1, 1, 16, 8),
]


def _ids(g):
    shape, K, s, d, c, B, H, Hkv, D, Dv = g
    return f"L{'x'.join(map(str, shape))}-K{'x'.join(map(str, K))}-s{''.join(map(str, s))}-d{''.join(map(str, d))}" \
        f"-c{''.join(str(int(x)) for x in c)}-B{B}H{H}kv{Hkv}D{D}v{Dv}"


def _run(geo, dtype, seed, vals=None):
    shape, K, s, d, c, B, H, Hkv, D, Dv = geo
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, *shape, H, D))
    k = rng.standard_normal((B, *shape, Hkv, D))
    v = rng.standard_normal((B, *shape, Hkv, Dv)) if vals is None else vals
    kw = dict(kernel_size=list(K), stride=list(s), dilation=list(d), is_causal=list(c), scale=None)
    args = [mx.array(x.astype(np.float32)).astype(dtype) for x in (q, k, v)]
    ext.path_counts(True)
    out, lse = ext.fused_forward(*args, None, None, None, **kw)
    mx.eval(out, lse)
    counts = ext.path_counts(True)
    return (q, k, v, kw), np.array(out.astype(mx.float32), np.float64), np.array(lse, np.float64), counts


@pytest.mark.parametrize("row2d", ["1", "0"])
@pytest.mark.parametrize("geo", GEOS, ids=[_ids(g) for g in GEOS])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["f32", "f16"])
def test_row2d_forward_against_oracle(geo, row2d, dtype, monkeypatch):
    monkeypatch.setenv("NATTEN_MLX_ROW2D", row2d)
    (q, k, v, kw), out, lse, counts = _run(geo, dtype, 11)
    assert counts[0] + counts[1] > 0, "the exact path served no query"
    qd, kd, vd = (np.array(mx.array(x.astype(np.float32)).astype(dtype).astype(mx.float32), np.float64) for x in (q, k, v))
    want_out, want_lse = oracle.na_forward(qd, kd, vd, kernel_size=tuple(kw["kernel_size"]), stride=tuple(kw["stride"]),
                                           dilation=tuple(kw["dilation"]), is_causal=tuple(kw["is_causal"]))
    for got, want, what in ((out, want_out, "out"), (lse, want_lse, "lse")):
        assert_close(got, want, TOL[dtype], what)


@pytest.mark.parametrize("geo", [GEOS[1], GEOS[3], GEOS[7]], ids=[_ids(g) for g in (GEOS[1], GEOS[3], GEOS[7])])
def test_row2d_equals_default_path(geo, monkeypatch):
    """Both paths serve the same queries and agree to float32 rounding (different summation order)."""
    monkeypatch.setenv("NATTEN_MLX_ROW2D", "1")
    _, out1, lse1, c1 = _run(geo, mx.float32, 5)
    monkeypatch.setenv("NATTEN_MLX_ROW2D", "0")
    _, out0, lse0, c0 = _run(geo, mx.float32, 5)
    assert c1[:3] == c0[:3]
    assert np.abs(out1 - out0).max() <= 1e-5 * max(1.0, np.abs(out0).max())
    assert np.abs(lse1 - lse0).max() <= 1e-5 * max(1.0, np.abs(lse0).max())


def test_row2d_inf_value_stays_in_its_windows(monkeypatch):
    """The row path multiplies only in-window pairs: an inf value reaches exactly the queries whose
    windows hold it (as NaN or inf), every other query equals the oracle with that value zeroed, and
    the exact path (border blocks included) serves every query in one round."""
    monkeypatch.setenv("NATTEN_MLX_ROW2D", "1")
    geo = ((8, 40), (3, 5), (1, 1), (1, 1), (False, False), 1, 2, 1, 8, 4)
    shape, K = geo[0], geo[1]
    rng = np.random.default_rng(3)
    v = rng.standard_normal((1, *shape, 1, 4))
    bad = (3, 17)
    v_inf = v.copy()
    v_inf[(0, *bad, 0, 0)] = np.inf
    (q, k, _, kw), out, _, counts = _run(geo, mx.float32, 3, vals=v_inf)
    assert counts[2] == 0 and counts[0] + counts[1] == 2 * int(np.prod(shape))
    v_zero = v.copy()
    v_zero[(0, *bad, 0)] = 0.0
    want, _ = oracle.na_forward(q, k, v_zero, kernel_size=K, stride=(1, 1), dilation=(1, 1), is_causal=(False, False))
    # the queries whose windows hold the bad token
    sees = oracle.na_mask(shape, K)[:, np.ravel_multi_index(bad, shape)].reshape(shape)
    assert sees.any() and not sees.all()
    assert np.all(np.isfinite(out[0][~sees]))
    assert not np.any(np.isfinite(out[0][sees][..., 0]))
    assert np.abs(out[0][~sees] - want[0][~sees]).max() <= 2e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("Dv", [32, 35, 40, 72])
def test_1d_rows_forward_value_widths(Dv):
    """1D on heads-last rows (kt.row_fwd) with value widths that take row_fwd's P.V in passes of four
    vectors, then single vectors, then single floats (8 or 16 floats to a vector), and an odd head
    count (the single-query tail), against the oracle."""
    geo = ((260,), (7,), (1,), (1,), (False,), 1, 3, 3, 32, Dv)
    (q, k, v, kw), out, lse, counts = _run(geo, mx.float32, 21)
    assert counts[0] + counts[1] > 0
    want_out, want_lse = oracle.na_forward(q, k, v, kernel_size=(7,), stride=(1,), dilation=(1,), is_causal=(False,))
    assert np.abs(out - want_out).max() <= 2e-5 * max(1.0, np.abs(want_out).max())
    assert np.abs(lse - want_lse).max() <= 2e-5 * max(1.0, np.abs(want_lse).max())
