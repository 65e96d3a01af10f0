"""The nanobind tier's primitives against the float64 oracle (tests/oracle.py), forward and backward.

Random configurations come from tests/configs.py (seeded): 1D/2D/3D, even/odd kernels, stride,
dilation, per-axis causal, GQA/MQA, D_v != D, extra keys/values, rpb, custom scale; every dtype.
Gradients are the primitive's own vjp (mx.vjp through the op), with random cotangents for out and lse.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import oracle
import pytest
from configs import cfg_id, random_config, random_tensors
from nb_checks import assert_close

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)
ext = nb.extension()
# queries per vector of the kernels this machine runs (NATTEN_MLX_SIMD may force another table): the
# exact path's blocks are VW queries long, so which queries its runs, border blocks and tiles serve
# depends on it; tests of those paths size their rows by it
VW = 16 if ext.simd() == "avx512" else 8

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# relative to the largest reference magnitude; float32 arithmetic throughout, inputs/outputs rounded
TOL = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}


def _configs(seed, count, max_len):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        na_dim = (1, 2, 3)[i % 3]
        cfg = random_config(rng, na_dim, max_len[na_dim])
        out.append((cfg, DTYPES[(i // 3) % 3], int(rng.integers(1 << 30))))
    return out


FUSED = _configs(2026, 150, {1: 24, 2: 9, 3: 6})
SPLIT = _configs(7, 60, {1: 16, 2: 7, 3: 5})


def _mx(x, dtype):
    return None if x is None else mx.array(np.asarray(x, np.float32)).astype(dtype)


def _np(x):
    return None if x is None else np.array(x.astype(mx.float32), dtype=np.float64)


def _window(cfg):
    return dict(kernel_size=list(cfg["K"]), stride=list(cfg["s"]), dilation=list(cfg["d"]), is_causal=list(cfg["c"]))


def _close(got, want, dtype, what):
    assert_close(got, want, TOL[dtype], f"{what} ({dtype})")


@pytest.mark.parametrize("cfg,dtype,seed", FUSED, ids=[f"{cfg_id(c)}-{str(d)[5:]}" for c, d, _ in FUSED])
def test_fused_forward_backward(cfg, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v, ak, av, rpb = (_mx(x, dtype) for x in random_tensors(rng, cfg))
    qn, kn, vn, akn, avn, rpbn = (_np(x) for x in (q, k, v, ak, av, rpb))
    kw = dict(_window(cfg), scale=cfg["scale"])
    args = dict(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"], scale=cfg["scale"],
                additional_keys=akn, additional_values=avn, rpb=rpbn)
    want_out, want_lse = oracle.na_forward(qn, kn, vn, **args)
    present = [x for x in (q, k, v, ak, av, rpb) if x is not None]
    names = [n for n, x in zip(("q", "k", "v", "additional_keys", "additional_values", "rpb"), (q, k, v, ak, av, rpb)) if x is not None]

    def f(*xs):
        d = dict(zip(names, xs))
        return ext.fused_forward(d["q"], d["k"], d["v"], d.get("additional_keys"), d.get("additional_values"), d.get("rpb"), **kw)

    dout = rng.standard_normal(want_out.shape)
    dlse = rng.standard_normal(want_lse.shape)
    (out, lse), grads = mx.vjp(f, present, [_mx(dout, dtype), mx.array(dlse.astype(np.float32))])
    assert out.dtype == dtype and lse.dtype == mx.float32
    assert out.shape == tuple(want_out.shape) and lse.shape == tuple(want_lse.shape)
    _close(_np(out), want_out, dtype, "out")
    _close(_np(lse), want_lse, dtype, "lse")
    want = oracle.na_backward(qn, kn, vn, **args, dout=_np(_mx(dout, dtype)), dlse=dlse.astype(np.float32))
    for name, g in zip(names, grads):
        assert g.dtype == dtype and g.shape == tuple(present[names.index(name)].shape)
        _close(_np(g), want[name], dtype, f"d_{name}")


@pytest.mark.parametrize("cfg,dtype,seed", SPLIT, ids=[f"{cfg_id(c)}-{str(d)[5:]}" for c, d, _ in SPLIT])
def test_split_ops(cfg, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v, ak, av, rpb = (_mx(x, dtype) for x in random_tensors(rng, cfg))
    qn, kn, vn, akn, avn, rpbn = (_np(x) for x in (q, k, v, ak, av, rpb))
    win = _window(cfg)
    geo = dict(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"])
    # qk
    qk_in = [x for x in (q, k, ak, rpb) if x is not None]
    qk_names = [n for n, x in zip(("q", "k", "additional_keys", "rpb"), (q, k, ak, rpb)) if x is not None]

    def fqk(*xs):
        d = dict(zip(qk_names, xs))
        return ext.qk_forward(d["q"], d["k"], d.get("additional_keys"), d.get("rpb"), scale=cfg["scale"], **win)

    want_s = oracle.na_qk(qn, kn, **geo, rpb=rpbn, scale=cfg["scale"], additional_keys=akn)
    ds = rng.standard_normal(want_s.shape)
    (s,), grads = mx.vjp(fqk, qk_in, [_mx(ds, dtype)])
    got = _np(s)
    assert np.array_equal(np.isneginf(got), np.isneginf(want_s)), "invalid causal slots must be -inf"
    fin = np.isfinite(want_s)
    _close(got[fin], want_s[fin], dtype, "scores")
    want = oracle.na_qk_backward(qn, kn, **geo, rpb=rpbn, scale=cfg["scale"], additional_keys=akn, dscores=_np(_mx(ds, dtype)))
    for name, g in zip(qk_names, grads):
        _close(_np(g), want[name], dtype, f"qk d_{name}")
    # av, with softmax-like weights (invalid slots carry garbage that must be ignored)
    attn = rng.random(want_s.shape)
    a = _mx(attn, dtype)
    av_in = [x for x in (a, v, av) if x is not None]
    av_names = [n for n, x in zip(("attn", "value", "additional_values"), (a, v, av)) if x is not None]

    def fav(*xs):
        d = dict(zip(av_names, xs))
        return ext.av_forward(d["attn"], d["value"], d.get("additional_values"), **win)

    want_o = oracle.na_av(_np(a), vn, **geo, additional_values=avn)
    do = rng.standard_normal(want_o.shape)
    (o,), grads = mx.vjp(fav, av_in, [_mx(do, dtype)])
    _close(_np(o), want_o, dtype, "av out")
    want = oracle.na_av_backward(_np(a), vn, **geo, additional_values=avn, dout=_np(_mx(do, dtype)))
    for name, g in zip(av_names, grads):
        _close(_np(g), want[name], dtype, f"av d_{name}")


def _long_last_axis(seed, count):
    """Configurations whose last axis is long (>= K + 16 queries per dilation group, stride 1 half of
    the time) so that the exact-window forward path (consecutive queries per vector lane) runs, not
    only the tile path that short axes take."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        na_dim = (1, 2)[i % 2]
        cfg = random_config(rng, na_dim, 6)
        K = int(rng.integers(2, 10))
        d = int(rng.integers(1, 3))
        s = 1 if rng.random() < 0.5 else int(rng.integers(1, K + 1))
        c = bool(rng.random() < 0.3)
        L = d * (K + 16 + int(rng.integers(0, 24)))
        for key, val in (("shape", L), ("K", K), ("s", s), ("d", d), ("c", c)):
            cfg[key] = tuple(cfg[key][:-1]) + (val,)
        cfg.update(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"])
        if any(cfg["c"]):
            cfg["rpb"] = False
        out.append((cfg, DTYPES[(i // 2) % 3], int(rng.integers(1 << 30))))
    return out


LONG = _long_last_axis(99, 24)


@pytest.mark.parametrize("cfg,dtype,seed", LONG, ids=[f"long-{cfg_id(c)}-{str(d)[5:]}" for c, d, _ in LONG])
def test_fused_long_last_axis(cfg, dtype, seed):
    test_fused_forward_backward(cfg, dtype, seed)


@pytest.mark.parametrize("dilation", [1, 2])
def test_exact_path_keeps_inf_in_its_windows(dilation):
    """An inf value token only reaches the queries whose windows hold it: every other output row
    equals the oracle's on the same inputs with that token zeroed."""
    rng = np.random.default_rng(5)
    L, K = 64 * dilation, 5
    q, k, v = (rng.standard_normal((1, L, 2, 8)) for _ in range(3))
    bad = 40 * dilation
    v_inf = v.copy()
    v_inf[0, bad, 0, 0] = np.inf
    out = ext.fused_forward(_mx(q, mx.float32), _mx(k, mx.float32), _mx(v_inf, mx.float32), None, None, None,
                            kernel_size=[K], stride=[1], dilation=[dilation], is_causal=[False], scale=None)[0]
    v_zero = v.copy()
    v_zero[0, bad] = 0.0
    want, _ = oracle.na_forward(q, k, v_zero, kernel_size=(K,), stride=(1,), dilation=(dilation,), is_causal=(False,))
    got = _np(out)
    def sees_bad(i):
        g, first, last = oracle.axis_window(i, L, K, 1, dilation, False)
        return bad % dilation == g and first <= bad // dilation <= last

    sees = np.array([sees_bad(i) for i in range(L)])
    assert sees.any() and not sees.all()
    assert np.all(np.isfinite(got[0, ~sees])), "inf leaked outside its windows"
    _close(got[0, ~sees], want[0, ~sees], mx.float32, "rows that never see the inf token")


def _exact_configs(seed, count):
    """Configurations the exact-window path serves (no extra keys, no rpb; long last axis, stride 1
    there), 1D/2D/3D with random kernels, dilation, causal axes, GQA and D_v != D: its runs and the
    tile path's border queries both occur in each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        na_dim = (1, 2, 3)[i % 3]
        cfg = random_config(rng, na_dim, (0, 6, 5, 4)[na_dim], allow_rpb=False, allow_extra=False)
        K = int(rng.integers(2, 10))
        d = int(rng.integers(1, 3))
        c = bool(rng.random() < 0.3)
        L = d * (K + 16 + int(rng.integers(0, 24)))
        for key, val in (("shape", L), ("K", K), ("s", 1), ("d", d), ("c", c)):
            cfg[key] = tuple(cfg[key][:-1]) + (val,)
        cfg.update(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"])
        out.append((cfg, DTYPES[(i // 3) % 3], int(rng.integers(1 << 30))))
    return out


EXACT = _exact_configs(314, 18)


@pytest.mark.parametrize("exact", ["default", "runs", "off"])
@pytest.mark.parametrize("cfg,dtype,seed", EXACT, ids=[f"exact-{cfg_id(c)}-{str(d)[5:]}" for c, d, _ in EXACT])
def test_exact_window_paths(cfg, dtype, seed, exact, monkeypatch):
    """The oracle sweep on problems the exact-window forward and backward serve, through each mix of
    paths: runs and border blocks (NATTEN_MLX_EXACT unset); runs with tiles at every border (=runs);
    tiles only (=0). The path counters must show that those paths, and only those, ran, and the same
    in the forward and the backward."""
    if exact == "default":
        monkeypatch.delenv("NATTEN_MLX_EXACT", raising=False)
    else:
        monkeypatch.setenv("NATTEN_MLX_EXACT", {"runs": "runs", "off": "0"}[exact])
    ext.path_counts(True)
    test_fused_forward_backward(cfg, dtype, seed)
    counts = ext.path_counts(True)
    fwd, bwd = counts[:3], counts[3:6]
    assert fwd == bwd
    run, border, tile = fwd
    if exact == "default":
        assert run + border > 0
    elif exact == "runs":
        assert run > 0 and border == 0 and tile > 0
    else:
        assert run == 0 and border == 0 and tile > 0


@pytest.mark.parametrize("rows", [True, False])
def test_vector_width(rows, monkeypatch):
    """VW, which the shapes of the path tests below are derived from, is the chosen table's width: along
    a 1D row of L queries with K = 3, queries 1 .. L - 2 have windows that shift by one key per query,
    one run of L - 2 queries, which the runs-only path (NATTEN_MLX_EXACT=runs) serves exactly when it is
    at least a vector long. On heads-last rows (the default) and on transposed copies."""
    monkeypatch.setenv("NATTEN_MLX_EXACT", "runs")
    if not rows:
        monkeypatch.setenv("NATTEN_MLX_ROW1D", "0")
    kw = dict(kernel_size=[3], stride=[1], dilation=[1], is_causal=[False], scale=None)
    for L, served in ((VW + 2, True), (VW + 1, False)):
        q = mx.ones((1, L, 2, 8))
        ext.path_counts(True)
        mx.eval(ext.fused_forward(q, q, q, None, None, None, **kw)[0])
        run_f, border_f, tile_f = ext.path_counts(True)[:3]
        assert (run_f, border_f, tile_f) == ((2 * (L - 2), 0, 4) if served else (0, 0, 2 * L)), f"L = {L}, vw {VW}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_exact_window_border_blocks(na_dim, causal):
    """Border blocks (masked vectors of queries next to a run) serve every query the runs leave, so
    no tile runs, forward and backward; against the oracle."""
    # rows long enough for a run to keep whole blocks once the edges' border blocks take its ends
    L = {1: (5 * VW,), 2: (6, 4 * VW - 2), 3: (3, 4, 3 * VW + 3)}[na_dim]
    K = {1: (5,), 2: (3, 5), 3: (2, 3, 7)}[na_dim]
    cfg = dict(na_dim=na_dim, shape=L, B=1, H=2, Hkv=1, D=8, Dv=4, E=0, K=K, s=(1,) * na_dim, d=(1,) * na_dim,
               c=(causal,) * na_dim, rpb=False, scale=None)
    cfg.update(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"])
    ext.path_counts(True)
    test_fused_forward_backward(cfg, mx.float32, 11)
    run_f, border_f, tile_f, run_b, border_b, tile_b = ext.path_counts(True)[:6]
    assert run_f > 0 and border_f > 0 and tile_f == 0
    assert (run_b, border_b, tile_b) == (run_f, border_f, tile_f)


BORDER_ALONE = [
    # rows of 2 VW queries at K = 7 (C4's rows on AVX-512): a run there keeps one block and a tail,
    # border blocks serving 3 queries at each end; two border blocks serve the row instead
    (1, (2 * VW,), (7,), (1,), (False,)),
    (2, (5, 2 * VW), (3, 7), (1, 1), (False, False)),
    (3, (3, 4, 2 * VW), (2, 3, 7), (1, 1, 1), (False, True, False)),
    # dilation 2 (groups of 2 VW); causal along the first axis (along the last, a causal window's
    # border block spans K slots, as a run's blocks do: the run stays)
    (2, (4, 4 * VW), (3, 7), (1, 2), (False, False)),
    (2, (6, 2 * VW), (3, 7), (1, 1), (True, False)),
    # 2 VW + 3 queries at K = 5: three border blocks, the last overlapping the middle one's lanes
    (2, (4, 2 * VW + 3), (3, 5), (1, 1), (False, False)),
]


@pytest.mark.parametrize("inf", [None, "value", "key"])
@pytest.mark.parametrize("na_dim,shape,K,d,c", BORDER_ALONE, ids=[f"{x[0]}d-{x[1]}-k{x[2]}-d{x[3]}-c{x[4]}" for x in BORDER_ALONE])
def test_border_blocks_alone(na_dim, shape, K, d, c, inf):
    """Rows where border blocks alone compute fewer slots than a run with border blocks at its ends
    are served by border blocks only (no run, no tile), forward and backward, against the oracle. An
    inf value or key (inside the blocks' reads of a neighbour's keys) reaches only the windows that
    hold it: the rows whose windows miss it equal the oracle's with that token zeroed (forward), and
    so do the gradients it cannot reach (backward)."""
    rng = np.random.default_rng(31)
    B, H, Hkv, Dk, Dv = 1, 4, 2, 8, 12
    q = rng.standard_normal((B, *shape, H, Dk))
    k = rng.standard_normal((B, *shape, Hkv, Dk))
    v = rng.standard_normal((B, *shape, Hkv, Dv))
    dout = rng.standard_normal((B, *shape, H, Dv))
    kw = dict(kernel_size=list(K), stride=[1] * na_dim, dilation=list(d), is_causal=list(c), scale=None)
    ok = dict(kernel_size=K, stride=(1,) * na_dim, dilation=d, is_causal=c)
    tok = tuple(x // 2 for x in shape[:-1]) + (VW + 1,)
    if inf is not None:
        x = {"value": v, "key": k}[inf]
        x[(0, *tok, 1, 0)] = np.inf
    f = lambda a, b, cc: ext.fused_forward(a, b, cc, None, None, None, **kw)[0]
    ext.path_counts(True)
    out, grads = mx.vjp(f, [_mx(x, mx.float32) for x in (q, k, v)], [_mx(dout, mx.float32)])
    mx.eval(out, grads)
    run_f, border_f, tile_f, run_b, border_b, tile_b = ext.path_counts(True)[:6]
    n = B * H * int(np.prod(shape))
    if inf is None:
        assert (run_f, border_f, tile_f) == (0, n, 0) and (run_b, border_b, tile_b) == (0, n, 0)
    qc, kc, vc = q.copy(), k.copy(), v.copy()
    if inf is not None:
        {"value": vc, "key": kc}[inf][(0, *tok, 1)] = 0.0
    want_out, _ = oracle.na_forward(qc, kc, vc, **ok)
    want = oracle.na_backward(qc, kc, vc, dout=dout, **ok)
    mask = oracle.na_mask(shape, K, 1, d, c)
    t = int(np.ravel_multi_index(tok, shape))
    hit_q = mask[:, t] if inf is not None else np.zeros(mask.shape[0], bool)  # queries whose windows hold it
    hit_k = mask[hit_q].any(0)  # keys in those windows (their gradients see it)
    flat = lambda x: x[0].reshape(-1, *x.shape[-2:])
    assert (~hit_q).sum() >= 4
    got_out = flat(_np(out[0]))
    assert np.all(np.isfinite(got_out[~hit_q])), "inf leaked outside its windows"
    _close(got_out[~hit_q], flat(want_out)[~hit_q], mx.float32, "out of rows that never see the inf")
    for name, g, sel in (("q", grads[0], ~hit_q), ("k", grads[1], ~hit_k), ("v", grads[2], ~hit_k)):
        _close(flat(_np(g))[sel], flat(want[name])[sel], mx.float32, f"d{name} the inf cannot reach")


@pytest.mark.parametrize("rows", [False, True])
def test_exact_backward_path_off_for_nonfinite_inputs(rows, monkeypatch):
    """A non-finite query keeps the backward on the tile path (the exact path multiplies zeros into
    its padding, which inf would turn into NaN) when the 1D exact path runs on transposed copies
    (NATTEN_MLX_ROW1D=0); on the heads-last rows (the default) it multiplies only in-window pairs and
    keeps serving, and the queries the inf cannot reach get the oracle's gradients."""
    if not rows:
        monkeypatch.setenv("NATTEN_MLX_ROW1D", "0")
    rng = np.random.default_rng(8)
    L, K = 48, 5
    q, k, v = (rng.standard_normal((1, L, 2, 8)) for _ in range(3))
    kw = dict(kernel_size=[K], stride=[1], dilation=[1], is_causal=[False], scale=None)
    qm, km, vm = (_mx(x, mx.float32) for x in (q, k, v))
    f = lambda a, b, c: ext.fused_forward(a, b, c, None, None, None, **kw)
    ext.path_counts(True)
    mx.eval(mx.vjp(f, [qm, km, vm], [mx.ones((1, L, 2, 8)), mx.zeros((1, L, 2))])[1])
    assert ext.path_counts(True)[3] > 0
    q_inf = q.copy()
    q_inf[0, 30, 1, 0] = np.inf
    grads = mx.vjp(f, [_mx(q_inf, mx.float32), km, vm], [mx.ones((1, L, 2, 8)), mx.zeros((1, L, 2))])[1]
    mx.eval(grads)
    counts = ext.path_counts(True)
    if not rows:
        assert counts[3] == 0 and counts[4] == 0
        return
    assert counts[3] > 0 and counts[4] > 0 and counts[5] == 0
    want = oracle.na_backward(q, k, v, kernel_size=(K,), stride=(1,), dilation=(1,), is_causal=(False,),
                              dout=np.ones((1, L, 2, 8)))
    dq = _np(grads[0])
    ok = np.ones(L, bool)
    ok[30] = False
    _close(dq[0, ok], want["q"][0, ok], mx.float32, "dq of queries other than the inf one")
    _close(dq[0, 30, 0], want["q"][0, 30, 0], mx.float32, "dq of the inf query's other head")


@pytest.mark.parametrize("dilation,causal,stride", [(1, False, 1), (3, False, 1), (2, True, 1), (1, False, 3), (2, False, 2)])
def test_exact_window_long_1d(dilation, causal, stride):
    """A 1D row long enough to be cut into several chunks (each transposes its own keys and values,
    with the neighbouring chunks' keys at its edges), forward and backward, against the oracle; with
    a stride, border blocks serve every query (their key ranges overlap several deep: the backward
    must never add two of them at once). Repeated: a lost update would show only now and then."""
    L = 700 * dilation
    cfg = dict(na_dim=1, shape=(L,), B=2, H=2, Hkv=2, D=16, Dv=8, E=0, K=(7,), s=(stride,), d=(dilation,),
               c=(causal,), rpb=False, scale=None)
    cfg.update(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"])
    for rep in range(3):
        ext.path_counts(True)
        test_fused_forward_backward(cfg, mx.float32, 3 + rep)
        counts = ext.path_counts(True)
        assert counts[:3] == counts[3:6]
        run_f, border_f, tile_f = counts[:3]
        assert border_f > 0 and tile_f == 0
        assert (run_f > 0) == (stride == 1)


@pytest.mark.parametrize("B", [2, 1])
@pytest.mark.parametrize(
    "shape,K,d,c",
    [((12, 40), (5, 7), (1, 1), (False, False)), ((9, 21), (3, 9), (1, 1), (False, True)),
     ((14, 26), (7, 5), (2, 2), (True, False)), ((20, 12), (9, 3), (1, 1), (False, False))],
)
def test_exact_2d_streamed_transposes(shape, K, d, c, B):
    """2D with at least two slices per thread (B * Hkv = 8 or 4 on two threads): tasks transpose
    key and value rows just ahead of the row pairs that read them, and border blocks read past a
    row's end into the next rows (short rows: several of them). With B = 1 the forward's tasks take
    all four heads and split the rows between them, each part transposing into its own buffers from
    its first rows on (border blocks also read before a row's start). A first call whose values hold
    inf leaves inf in the reused buffers; the finite calls after it must never read a row not yet
    transposed. Against the oracle, forward and backward."""
    shape = (shape[0], shape[1] * VW // 8)  # rows as long in vectors as with 8 queries per vector
    cfg = dict(na_dim=2, shape=shape, B=B, H=8, Hkv=4, D=8, Dv=12, E=0, K=K, s=(1, 1), d=d, c=c, rpb=False, scale=None)
    cfg.update(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"])
    v_inf = np.full((B, *shape, 4, 12), np.inf, np.float32)
    q0 = mx.zeros((B, *shape, 8, 8))
    mx.eval(ext.fused_forward(q0, mx.zeros((B, *shape, 4, 8)), mx.array(v_inf), None, None, None, **_window(cfg))[0])
    for rep in range(3):
        ext.path_counts(True)
        test_fused_forward_backward(cfg, mx.float32, 40 + rep)
        run_f, border_f, tile_f = ext.path_counts(True)[:3]
        assert run_f + border_f > 0 and tile_f == 0


@pytest.mark.parametrize(
    "shape,K,d,c",
    [((4, 8, 40), (3, 5, 7), (1, 1, 1), (False, False, False)), ((10, 6, 20), (5, 3, 9), (2, 1, 1), (True, False, False)),
     ((3, 14, 26), (2, 7, 5), (1, 2, 2), (False, True, False))],
)
def test_exact_3d_streamed_forward(shape, K, d, c):
    """3D with two slices per thread: the forward streams its key and value rows (in a ring of row slots
    unless NATTEN_MLX_RING=0) across planes, border blocks reading past a row's end into the next rows;
    after a call whose values hold inf (left in the reused buffers), against the oracle, forward and
    backward, and the counters show the streamed ring ran."""
    shape = (shape[0], shape[1], shape[2] * VW // 8)
    cfg = dict(na_dim=3, shape=shape, B=1, H=8, Hkv=4, D=8, Dv=12, E=0, K=K, s=(1, 1, 1), d=d, c=c, rpb=False,
               scale=None)
    cfg.update(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"])
    v_inf = np.full((1, *shape, 4, 12), np.inf, np.float32)
    mx.eval(ext.fused_forward(mx.zeros((1, *shape, 8, 8)), mx.zeros((1, *shape, 4, 8)), mx.array(v_inf), None, None,
                              None, **_window(cfg))[0])
    ext.path_counts(True)
    test_fused_forward_backward(cfg, mx.float32, 60)
    counts = ext.path_counts(True)
    assert counts[0] + counts[1] > 0 and counts[2] == 0
    if ext.num_threads() == 2 and os.environ.get("NATTEN_MLX_RING") != "0":
        assert counts[6] == 1, "the forward did not stream on a ring"


@pytest.mark.parametrize("na_dim,B,Hkv", [(1, 1, 1), ("1-rows", 1, 1), (2, 1, 1), (2, 2, 2)])
def test_forward_inf_value_read_by_border_blocks(na_dim, B, Hkv, monkeypatch):
    """The forward plans border blocks before it has looked at the values and checks them where it
    transposes them; an inf value next to a border (inside border blocks' reads) sends it round again
    without border blocks (tiles at the borders). Rows whose windows miss the inf token equal the
    oracle's with that token zeroed; the path counters count the second round only. 2D with B * Hkv = 4
    streams its transposes (two slices per thread), with 1 it transposes whole slices. 1D on heads-last
    rows ("1-rows", the default; plain 1D runs with NATTEN_MLX_ROW1D=0) multiplies only in-window
    pairs: its border blocks serve the inf value in the first round."""
    rows = na_dim == "1-rows"
    na_dim = 1 if rows else na_dim
    if na_dim == 1 and not rows:
        monkeypatch.setenv("NATTEN_MLX_ROW1D", "0")
    rng = np.random.default_rng(17)
    shape, K = {1: ((40,), (5,)), 2: ((6, 40), (3, 5))}[na_dim]
    H = 2 * Hkv
    q = rng.standard_normal((B, *shape, H, 8))
    k = rng.standard_normal((B, *shape, Hkv, 8))
    v = rng.standard_normal((B, *shape, Hkv, 4))
    bad = (2,) * (na_dim - 1) + (1,)
    v_inf = v.copy()
    v_inf[(0, *bad, 0, 0)] = np.inf
    kw = dict(kernel_size=list(K), stride=[1] * na_dim, dilation=[1] * na_dim, is_causal=[False] * na_dim, scale=None)
    ext.path_counts(True)
    out = ext.fused_forward(_mx(q, mx.float32), _mx(k, mx.float32), _mx(v_inf, mx.float32), None, None, None, **kw)[0]
    got = _np(out)
    run_f, border_f, tile_f = ext.path_counts(True)[:3]
    if rows:
        assert border_f > 0 and tile_f == 0 and run_f + border_f == B * H * int(np.prod(shape))
    else:
        assert border_f == 0 and tile_f > 0 and run_f + tile_f == B * H * int(np.prod(shape))
    v_zero = v.copy()
    v_zero[(0, *bad, 0)] = 0.0
    want, _ = oracle.na_forward(q, k, v_zero, kernel_size=K, stride=(1,) * na_dim, dilation=(1,) * na_dim,
                                is_causal=(False,) * na_dim)
    # the queries whose windows hold the bad token
    sees = oracle.na_mask(shape, K)[:, np.ravel_multi_index(bad, shape)].reshape(shape)
    assert sees.any() and not sees.all()
    assert np.all(np.isfinite(got[0][~sees])), "inf leaked outside its windows"
    _close(got[0][~sees], want[0][~sees], mx.float32, "rows that never see the inf token")
    if B > 1:
        _close(got[1:], want[1:], mx.float32, "other batch entries")


@pytest.mark.parametrize("where", ["query", "key", "value", "dout"])
@pytest.mark.parametrize("na_dim,B,Hkv", [(1, 1, 1), ("1-rows", 1, 1), (2, 1, 1), (2, 2, 2), (3, 1, 1)])
def test_backward_nonfinite_input_found_where_transposed(na_dim, B, Hkv, where, monkeypatch):
    """The backward plans the exact path (border blocks too) before it has looked at its inputs and
    checks them where it transposes them; an inf query, key or output gradient sends it round again
    on the tile path, an inf value without border blocks (the path counters count the second round
    only; without the check the exact path's counters would be non-zero). Gradients the inf cannot
    reach equal the oracle's on the clean inputs. 1D: keys gathered per piece; 2D with B * Hkv = 4:
    streamed transposes (two slices per thread); 2D with 1 and 3D: whole slices. 1D on heads-last
    rows ("1-rows", the default; the plain 1D case runs with NATTEN_MLX_ROW1D=0): only in-window
    pairs are multiplied, so the exact path serves every input in one round."""
    rows = na_dim == "1-rows"
    na_dim = 1 if rows else na_dim
    if na_dim == 1 and not rows:
        monkeypatch.setenv("NATTEN_MLX_ROW1D", "0")
    rng = np.random.default_rng(23)
    shape, K = {1: ((40,), (5,)), 2: ((6, 40), (3, 5)), 3: ((4, 5, 24), (3, 3, 5))}[na_dim]
    H = 2 * Hkv
    q = rng.standard_normal((B, *shape, H, 8))
    k = rng.standard_normal((B, *shape, Hkv, 8))
    v = rng.standard_normal((B, *shape, Hkv, 4))
    dout = rng.standard_normal((B, *shape, H, 4))
    tok = (2,) * (na_dim - 1) + (17,)
    x = {"query": q, "key": k, "value": v, "dout": dout}[where].copy()
    x[(0, *tok, 0, 1)] = np.inf
    args = {"query": q, "key": k, "value": v, "dout": dout}
    args[where] = x
    kw = dict(kernel_size=list(K), stride=[1] * na_dim, dilation=[1] * na_dim, is_causal=[False] * na_dim, scale=None)
    f = lambda a, b, c: ext.fused_forward(a, b, c, None, None, None, **kw)[0]
    mx.eval(f(*(_mx(args[n], mx.float32) for n in ("query", "key", "value"))))
    ext.path_counts(True)
    _, grads = mx.vjp(f, [_mx(args[n], mx.float32) for n in ("query", "key", "value")], [_mx(args["dout"], mx.float32)])
    dq, dk, dv = (_np(g) for g in grads)
    run_b, border_b, tile_b = ext.path_counts(True)[3:6]
    if rows:
        assert border_b > 0 and tile_b == 0, f"inf {where}: the 1D row path went round again"
    elif where == "value":
        assert border_b == 0 and run_b > 0, "an inf value must turn the backward's border blocks off"
    else:
        assert run_b == 0 and border_b == 0 and tile_b == B * H * int(np.prod(shape)), f"inf {where}: exact path ran"
    want = oracle.na_backward(q, k, v, kernel_size=K, stride=(1,) * na_dim, dilation=(1,) * na_dim,
                              is_causal=(False,) * na_dim, dout=dout)
    mask = oracle.na_mask(shape, K)  # [query, key], row-major tokens
    t = int(np.ravel_multi_index(tok, shape))
    # queries the inf reaches (its own token, or those whose windows hold it), and their windows' keys
    hit_q = mask[:, t] if where in ("key", "value") else np.eye(mask.shape[0], dtype=bool)[t]
    hit_k = mask[hit_q].any(0)
    flat = lambda g: g[0].reshape(-1, *g.shape[-2:])
    for name, got, ok in (("dq", dq, ~hit_q), ("dk", dk, ~hit_k), ("dv", dv, ~hit_k)):
        ref = {"dq": want["q"], "dk": want["k"], "dv": want["v"]}[name]
        assert ok.sum() > 10
        _close(flat(got)[ok], flat(ref)[ok], mx.float32, f"inf {where}: {name} the inf cannot reach")
        if B > 1:
            _close(got[1:], ref[1:], mx.float32, f"inf {where}: {name} of other batch entries")


@pytest.mark.parametrize("L,K,d,c,mode", [(3 * VW - 1, 3, 3, False, "all"), (4 * VW - 3, 3, 4, True, "all"),
                                         (300, 5, 1, True, "runs"), (300, 4, 2, False, "runs")])
def test_1d_backward_keys_pieces_do_not_write(L, K, d, c, mode, monkeypatch):
    """1D keys that no exact-path piece writes (groups shorter than a vector, or border queries left
    to tiles): the pieces store their sums where they write first instead of adding to zeroed
    gradients, and zero the other keys before the tiles add theirs. Buffers MLX hands out again
    (filled with 7s here first) must not show through. Against the oracle, twice."""
    monkeypatch.setenv("NATTEN_MLX_EXACT", mode)
    rng = np.random.default_rng(29)
    H = 2
    q, k, v, dout = (rng.standard_normal((1, L, H, 8)) for _ in range(4))
    kw = dict(kernel_size=[K], stride=[1], dilation=[d], is_causal=[c], scale=None)
    f = lambda a, b, cc: ext.fused_forward(a, b, cc, None, None, None, **kw)[0]
    want = oracle.na_backward(q, k, v, kernel_size=(K,), stride=(1,), dilation=(d,), is_causal=(c,), dout=dout)
    for _ in range(2):
        junk = [mx.full(q.shape, 7.0) for _ in range(4)]
        mx.eval(junk)
        del junk
        ext.path_counts(True)
        _, grads = mx.vjp(f, [_mx(x, mx.float32) for x in (q, k, v)], [_mx(dout, mx.float32)])
        mx.eval(grads)
        run_b, border_b, tile_b = ext.path_counts(True)[3:6]
        assert run_b + border_b > 0 and tile_b > 0
        for name, got in zip("qkv", grads):
            _close(_np(got), want[name], mx.float32, f"d{name}")


@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize(
    "L,K,s,d,c,H,Hkv,D,Dv,B",
    [(1100, 7, 1, 1, False, 4, 4, 32, 32, 1), (1300, 9, 1, 2, True, 4, 2, 16, 24, 2), (900, 6, 3, 1, False, 3, 1, 5, 11, 1),
     (1000, 13, 1, 3, False, 2, 2, 40, 8, 2), (700, 4, 2, 2, True, 2, 1, 32, 32, 1)],
)
def test_1d_backward_rows(L, K, s, d, c, H, Hkv, D, Dv, B, rows, monkeypatch):
    """The 1D backward on heads-last rows (kt.row_bwd; many pieces in two waves, key gradients left
    through rings of rows) and on transposed copies (NATTEN_MLX_ROW1D=0), against the oracle: long rows,
    GQA, D and Dv that do and do not fill whole vectors, dilation, causal, stride, lse cotangents."""
    if not rows:
        monkeypatch.setenv("NATTEN_MLX_ROW1D", "0")
    cfg = dict(na_dim=1, shape=(L,), B=B, H=H, Hkv=Hkv, D=D, Dv=Dv, E=0, K=(K,), s=(s,), d=(d,), c=(c,), rpb=False,
               scale=None)
    cfg.update(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"])
    ext.path_counts(True)
    test_fused_forward_backward(cfg, mx.float32, L + K)
    counts = ext.path_counts(True)
    assert counts[3] + counts[4] > 0 and counts[:3] == counts[3:6]
