"""Non-temporal stores of the exact path's outputs (NATTEN_MLX_NT, read on every call): the forward's out
rows (from value rows, exact_fwd2r, and from transposed lanes, store_lanes), the backward's dq rows and its
dk/dv sums stored where no tile adds to them. They write whole 64-byte lines that bypass the caches, by
default for outputs of 1 MiB or more (NATTEN_MLX_NT=2: every size, as here; 0: never).

The same bits with and without them (out, lse, dq, dk, dv), on geometries that reach each store: runs
and border blocks, dilation, even and causal kernels, GQA, D != Dv, 3D, the 1D path on transposed copies
(NATTEN_MLX_ROW1D=0), stride (tiles add to the exact path's stored dk/dv), rows that are not whole lines
(D = 24, Dv = 20: plain stores, and the counter says so); the float64 oracle on a few; and the default
threshold (a 2 MiB output takes them, a small one does not; float16 outputs, written to scratch converted
after, never do); and two Python threads calling the op at once.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import oracle
import pytest
from nb_checks import assert_close, fused_vjp, run_in_two_threads

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)
ext = nb.extension()
NTHR = ext.num_threads()

# (shape, kernel, stride, dilation, causal, Hkv, G, D, Dv, row1d)
GEOS = [
    ((24, 48), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32, True),
    ((20, 40), (5, 7), (1, 1), (2, 1), (False, False), 2, 2, 16, 48, True),
    ((18, 36), (4, 6), (1, 1), (1, 1), (True, False), 2, 1, 32, 16, True),
    ((12, 96), (3, 5), (1, 1), (1, 3), (False, True), 2, 1, 16, 32, True),
    ((16, 40), (3, 5), (2, 1), (1, 1), (False, False), 2, 1, 16, 16, True),
    ((6, 8, 64), (3, 3, 5), (1, 1, 1), (1, 1, 2), (False, False, True), 2, 1, 32, 32, True),
    ((20, 40), (5, 5), (1, 1), (1, 1), (False, False), 2, 1, 24, 20, True),
    ((1024,), (9,), (1,), (1,), (False,), 2, 1, 32, 32, False),
]


def _ids(g):
    shape, K, s, d, c, Hkv, G, D, Dv, r1 = g
    return (
        f"L{'x'.join(map(str, shape))}-K{'x'.join(map(str, K))}-s{''.join(map(str, s))}"
        f"-d{''.join(map(str, d))}-c{''.join(str(int(x)) for x in c)}-kv{Hkv}G{G}D{D}v{Dv}" + ("" if r1 else "-row1d0")
    )


def _whole_lines(geo):
    return geo[7] % 16 == 0 and geo[8] % 16 == 0


def _run(geo, seed, dtype=mx.float32, B=None):
    """out, lse, dq, dk, dv (float64 numpy), the inputs, kw, and the path counters of the call"""
    shape, K, s, d, c, Hkv, G, D, Dv, _ = geo
    B = B or max(1, -(-2 * NTHR // Hkv))  # two slices per kernel thread: the streamed path
    return fused_vjp(ext, shape, K, s, d, c, Hkv, G, D, Dv, B, seed, dtype)


@pytest.mark.parametrize("pvrows", ["1", "0"])
@pytest.mark.parametrize("geo", GEOS, ids=[_ids(g) for g in GEOS])
def test_nt_bits_equal_plain_stores(geo, pvrows, monkeypatch):
    monkeypatch.setenv("NATTEN_MLX_PVROWS", pvrows)
    monkeypatch.setenv("NATTEN_MLX_ROW1D", "1" if geo[-1] else "0")
    monkeypatch.setenv("NATTEN_MLX_NT", "2")
    nt, _, _, c1 = _run(geo, 7)
    monkeypatch.setenv("NATTEN_MLX_NT", "0")
    plain, _, _, c0 = _run(geo, 7)
    assert c1[0] + c1[1] > 0 and c1[3] + c1[4] > 0, "the exact path served no query"
    assert c1[:10] == c0[:10], "the stores changed which paths ran"
    # forward and backward (1D on transposed copies: only dq, the pieces add their dk/dv sums)
    assert c1[10] == (2 if _whole_lines(geo) else 0), f"{c1[10]} calls took non-temporal stores"
    assert c0[10] == 0, "NATTEN_MLX_NT=0 still took non-temporal stores"
    for a, b, what in zip(nt, plain, ("out", "lse", "dq", "dk", "dv")):
        assert np.all(np.isfinite(a)), what
        assert np.array_equal(a, b), f"{what} differs by {np.abs(a - b).max():.3g}"


@pytest.mark.parametrize(
    "geo", [GEOS[1], GEOS[2], GEOS[5], GEOS[7]], ids=[_ids(g) for g in (GEOS[1], GEOS[2], GEOS[5], GEOS[7])]
)
def test_nt_against_oracle(geo, monkeypatch):
    monkeypatch.setenv("NATTEN_MLX_ROW1D", "1" if geo[-1] else "0")
    monkeypatch.setenv("NATTEN_MLX_NT", "2")
    got, (q, k, v, cot, clse), kw, counts = _run(geo, 13)
    assert counts[10] == 2
    K, s, d, c = (tuple(kw[x]) for x in ("kernel_size", "stride", "dilation", "is_causal"))
    want_out, want_lse = oracle.na_forward(q, k, v, kernel_size=K, stride=s, dilation=d, is_causal=c)
    gr = oracle.na_backward(q, k, v, kernel_size=K, stride=s, dilation=d, is_causal=c, dout=cot, dlse=clse)
    for g_, w, what in zip(got, (want_out, want_lse, gr["q"], gr["k"], gr["v"]), ("out", "lse", "dq", "dk", "dv")):
        assert_close(g_, w, 3e-5, what)


def test_nt_default_threshold(monkeypatch):
    """By default: a 2 MiB output takes them (forward and backward), a 256 KiB one does not, and a float16
    one (the kernels write float32 scratch, converted after) never does."""
    monkeypatch.delenv("NATTEN_MLX_NT", raising=False)
    geo = ((64, 64), (7, 7), (1, 1), (1, 1), (False, False), 4, 1, 32, 32, True)
    big, _, _, c_big = _run(geo, 3, B=1)
    assert c_big[10] == 2
    small = ((32, 32), (7, 7), (1, 1), (1, 1), (False, False), 2, 1, 32, 32, True)
    assert _run(small, 3, B=1)[3][10] == 0
    assert _run(geo, 3, dtype=mx.float16, B=1)[3][10] == 0
    monkeypatch.setenv("NATTEN_MLX_NT", "0")
    plain, _, _, c0 = _run(geo, 3, B=1)
    assert c0[10] == 0
    for a, b in zip(big, plain):
        assert np.array_equal(a, b)


def test_nt_two_python_threads(monkeypatch):
    """Two Python threads calling the op at once (each call's kernel threads streaming their rows and
    fencing them before the call returns) get the bits of one thread alone."""
    monkeypatch.setenv("NATTEN_MLX_NT", "2")
    geos = [GEOS[0], GEOS[5]]
    want = [_run(g, 21)[0] for g in geos]
    errors = run_in_two_threads(
        lambda i: all(np.array_equal(a, b) for a, b in zip(_run(geos[i], 21)[0], want[i])), reps=4
    )
    assert not errors, errors
