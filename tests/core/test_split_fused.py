"""Split ops (na*d_qk / na*d_av) against the oracle's slot layout, and the split-vs-fused identity
``av(softmax(qk(q, k)), v) == na(q, k, v)``, forward and gradients.

Per run: 150 qk configurations (1D 60, 2D 50, 3D 40), the same 150 for av and for the identity,
each with forward and gradient checks.
"""

from __future__ import annotations

import numpy as np
import oracle
import pytest
from configs import cfg_id, pure_strategies, random_config, random_tensors

mx = pytest.importorskip("mlx.core")
natten_mlx = pytest.importorskip("natten_mlx")

QK = {1: natten_mlx.na1d_qk, 2: natten_mlx.na2d_qk, 3: natten_mlx.na3d_qk}
AV = {1: natten_mlx.na1d_av, 2: natten_mlx.na2d_av, 3: natten_mlx.na3d_av}
NA = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}

MAX_LEN = {1: 12, 2: 9, 3: 6}
COUNTS = {1: 60, 2: 50, 3: 40}
TOL = dict(rtol=1e-4, atol=1e-4)
GTOL = dict(rtol=1e-3, atol=2e-4)


def _configs():
    out = []
    for n in (1, 2, 3):
        rng = np.random.default_rng(3000 + n)
        for i in range(COUNTS[n]):
            cfg = random_config(rng, n, MAX_LEN[n])
            cfg["seed"] = 3000000 + 1000 * n + i
            out.append(cfg)
    return out


CONFIGS = _configs()
IDS = [cfg_id(c) for c in CONFIGS]


def _mx(x):
    return None if x is None else mx.array(np.asarray(x, dtype=np.float32))


def _np(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def _win(cfg):
    return dict(kernel_size=cfg["kernel_size"], stride=cfg["stride"], dilation=cfg["dilation"],
                is_causal=cfg["is_causal"])


def _owin(cfg):
    return dict(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"])


def test_configs_cover_features():
    assert len(CONFIGS) == 150
    assert any(c["E"] for c in CONFIGS) and any(c["rpb"] for c in CONFIGS)
    assert any(any(c["c"]) for c in CONFIGS) and any(max(c["s"]) > 1 for c in CONFIGS)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_qk_slot_layout_and_grads(cfg):
    rng = np.random.default_rng(cfg["seed"])
    q, k, _, ak, _, rpb = random_tensors(rng, cfg)
    n = cfg["na_dim"]
    exp = oracle.na_qk(q, k, rpb=rpb, scale=cfg["scale"], additional_keys=ak, **_owin(cfg))
    names = ["q", "k", "additional_keys", "rpb"]
    np_in = dict(q=q, k=k, additional_keys=ak, rpb=rpb)
    present = [x for x in names if np_in[x] is not None]

    def call(*arrays):
        kw = dict(zip(present, arrays))
        return QK[n](kw["q"], kw["k"], rpb=kw.get("rpb"), scale=cfg["scale"],
                     additional_keys=kw.get("additional_keys"), **_win(cfg))

    xs = [_mx(np_in[x]) for x in present]
    got = call(*xs)
    assert got.dtype == mx.float32
    assert tuple(got.shape) == exp.shape, (tuple(got.shape), exp.shape)
    g = _np(got)
    neg = np.isneginf(exp)
    np.testing.assert_array_equal(np.isneginf(g), neg, err_msg="-inf slots differ")
    np.testing.assert_allclose(g[~neg], exp[~neg], **TOL)

    G = rng.standard_normal(exp.shape)
    G_mx = _mx(G)
    # cotangent on every slot, -inf ones included: those scores are constants, so the weight
    # put on them must not reach any input
    _, grads = mx.vjp(call, xs, [G_mx])
    eg = oracle.na_qk_backward(q, k, rpb=rpb, scale=cfg["scale"], additional_keys=ak, dscores=G, **_owin(cfg))
    for name, gr in zip(present, grads):
        np.testing.assert_allclose(_np(gr), eg[name], **GTOL, err_msg=f"d{name}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_av_slot_layout_and_grads(cfg):
    rng = np.random.default_rng(cfg["seed"] + 1)
    _, _, v, _, av, _ = random_tensors(rng, cfg)
    n = cfg["na_dim"]
    B, H, E = cfg["B"], cfg["H"], cfg["E"]
    KK = int(np.prod(cfg["K"]))
    _, valid = oracle.slot_keys(cfg["shape"], cfg["K"], cfg["s"], cfg["d"], cfg["c"])
    attn = rng.standard_normal((B, *cfg["shape"], H, KK + E))
    # zero the causal slots past the query: what av does with weight there is not specified
    vmask = np.concatenate([valid, np.ones((valid.shape[0], E), bool)], axis=1)
    vmask = vmask.reshape(*cfg["shape"], 1, KK + E)
    attn = np.where(vmask[None], attn, 0.0)
    exp = oracle.na_av(attn, v, additional_values=av, **_owin(cfg))
    names = ["attn", "value", "additional_values"]
    np_in = dict(attn=attn, value=v, additional_values=av)
    present = [x for x in names if np_in[x] is not None]

    def call(*arrays):
        kw = dict(zip(present, arrays))
        return AV[n](kw["attn"], kw["value"], additional_values=kw.get("additional_values"), **_win(cfg))

    xs = [_mx(np_in[x]) for x in present]
    got = call(*xs)
    assert tuple(got.shape) == exp.shape
    np.testing.assert_allclose(_np(got), exp, **TOL)

    W = rng.standard_normal(exp.shape)
    grads = mx.grad(lambda *a: mx.sum(call(*a) * _mx(W)), argnums=list(range(len(xs))))(*xs)
    eg = oracle.na_av_backward(attn, v, additional_values=av, dout=W, **_owin(cfg))
    for name, gr in zip(present, grads):
        gr = _np(gr)
        if name == "attn":  # compare at valid slots only
            m = np.broadcast_to(vmask[None], gr.shape)
            np.testing.assert_allclose(gr[m], eg["attn"][m], **GTOL, err_msg="dattn")
        else:
            np.testing.assert_allclose(gr, eg[name], **GTOL, err_msg=f"d{name}")


STRATEGY_ENV, STRATEGIES = pure_strategies()


@pytest.mark.parametrize("strategy", STRATEGIES or ("<default>",))
@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=IDS[::3])
def test_split_ops_each_strategy(cfg, strategy, monkeypatch):
    """qk, av and the split-vs-fused identity under each strategy of the pure backend."""
    if STRATEGY_ENV:
        monkeypatch.setenv(STRATEGY_ENV, strategy)
    test_qk_slot_layout_and_grads(cfg)
    test_av_slot_layout_and_grads(cfg)
    test_split_equals_fused(cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_split_equals_fused(cfg):
    rng = np.random.default_rng(cfg["seed"] + 2)
    q, k, v, ak, av, rpb = random_tensors(rng, cfg)
    n = cfg["na_dim"]
    names = ["q", "k", "v", "additional_keys", "additional_values", "rpb"]
    np_in = dict(q=q, k=k, v=v, additional_keys=ak, additional_values=av, rpb=rpb)
    present = [x for x in names if np_in[x] is not None]
    xs = [_mx(np_in[x]) for x in present]

    def split(*arrays):
        kw = dict(zip(present, arrays))
        s = QK[n](kw["q"], kw["k"], rpb=kw.get("rpb"), scale=cfg["scale"],
                  additional_keys=kw.get("additional_keys"), **_win(cfg))
        a = mx.softmax(s, axis=-1)
        return AV[n](a, kw["v"], additional_values=kw.get("additional_values"), **_win(cfg))

    def fused(*arrays):
        kw = dict(zip(present, arrays))
        return NA[n](kw["q"], kw["k"], kw["v"], rpb=kw.get("rpb"), scale=cfg["scale"],
                     additional_keys=kw.get("additional_keys"), additional_values=kw.get("additional_values"),
                     **_win(cfg))

    exp, _ = oracle.na_forward(q, k, v, additional_keys=ak, additional_values=av, rpb=rpb, scale=cfg["scale"],
                               **_owin(cfg))
    o_split, o_fused = _np(split(*xs)), _np(fused(*xs))
    np.testing.assert_allclose(o_split, exp, **TOL, err_msg="split vs oracle")
    np.testing.assert_allclose(o_split, o_fused, **TOL, err_msg="split vs fused")

    W = rng.standard_normal(exp.shape)
    W_mx = _mx(W)
    g_split = mx.grad(lambda *a: mx.sum(split(*a) * W_mx), argnums=list(range(len(xs))))(*xs)
    eg = oracle.na_backward(q, k, v, additional_keys=ak, additional_values=av, rpb=rpb, scale=cfg["scale"],
                            dout=W, **_owin(cfg))
    for name, gr in zip(present, g_split):
        np.testing.assert_allclose(_np(gr), eg[name], **GTOL, err_msg=f"split d{name}")


def test_qk_causal_slot_example():
    """A hand-worked 1D example of the slot layout (L=6, K=3, stride 2, causal)."""
    # per SEMANTICS: leader = min((i//2)*2 + 1, 5); window_start = max(leader - 2, 0)
    # i: 0 1 2 3 4 5 -> leader 1 1 3 3 5 5 -> start 0 0 1 1 3 3
    q = mx.array(np.eye(6, dtype=np.float32)[None, :, None, :])  # q_i = e_i
    k = mx.array(np.eye(6, dtype=np.float32)[None, :, None, :] * np.arange(1, 7, dtype=np.float32)[None, :, None, None])
    # scores q_i . k_j = (j+1) if i == j else 0; with scale 1 each row is 0 except the query's own slot
    s = np.array(natten_mlx.na1d_qk(q, k, 3, stride=2, is_causal=True, scale=1.0))[0, :, 0, :]
    inf = -np.inf
    expect = np.array([
        [1, inf, inf],  # i=0: slots 0,1,2 -> keys 0 (self), 1, 2 (future)
        [0, 2, inf],    # i=1: keys 0, 1 (self), 2 (future)
        [0, 3, inf],    # i=2: start 1: keys 1, 2 (self), 3
        [0, 0, 4],      # i=3: keys 1, 2, 3 (self)
        [0, 5, inf],    # i=4: start 3: keys 3, 4 (self), 5
        [0, 0, 6],      # i=5: keys 3, 4, 5 (self)
    ], dtype=np.float64)
    np.testing.assert_array_equal(s, expect)
    np.testing.assert_array_equal(
        oracle.na_qk(np.array(q), np.array(k), 3, stride=2, is_causal=True, scale=1.0)[0, :, 0, :], expect)
