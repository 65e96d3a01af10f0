"""The mlx.nn modules: fused and split paths agree, against the float64 oracle; mx.compile works."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import natten_mlx as na
import numpy as np
import pytest
from oracle import na_forward as oracle_na

MODULES = {1: na.NeighborhoodAttention1D, 2: na.NeighborhoodAttention2D, 3: na.NeighborhoodAttention3D}
CASES = [
    # na_dim, spatial, kwargs
    (1, (11,), dict(kernel_size=4, stride=2, dilation=2)),
    (1, (9,), dict(kernel_size=3, is_causal=True, num_kv_heads=1)),
    (2, (7, 8), dict(kernel_size=(3, 4), dilation=(2, 1), rel_pos_bias=True)),
    (2, (6, 6), dict(kernel_size=3, stride=(1, 3), is_causal=(True, False), num_kv_heads=2)),
    (3, (4, 5, 6), dict(kernel_size=(2, 3, 3), rel_pos_bias=True, qk_scale=0.3)),
]


def _module(n, kwargs, attn_drop=0.0, seed=0):
    mx.random.seed(seed)
    return MODULES[n](embed_dim=16, num_heads=4, attn_drop=attn_drop, **kwargs)


def _reference(module, x, n):
    """The module's function computed with the float64 oracle from its own weights."""
    xs = np.array(x, dtype=np.float64)
    lead = xs.shape[:-1]
    w = np.array(module.qkv.weight, dtype=np.float64)
    b = np.array(module.qkv.bias, dtype=np.float64)
    qkv = xs @ w.T + b
    h, hk, d = module.num_heads, module.num_kv_heads, module.head_dim
    q = qkv[..., : h * d].reshape(*lead, h, d)
    k = qkv[..., h * d : (h + hk) * d].reshape(*lead, hk, d)
    v = qkv[..., (h + hk) * d :].reshape(*lead, hk, d)
    rpb = None if module.rpb is None else np.array(module.rpb, dtype=np.float64)
    out = oracle_na(q, k, v, module.kernel_size, module.stride, module.dilation, module.is_causal,
                    scale=module.scale, rpb=rpb)[0]
    out = out.reshape(*lead, h * d)
    return out @ np.array(module.proj.weight, dtype=np.float64).T + np.array(module.proj.bias, dtype=np.float64)


@pytest.mark.parametrize("n, spatial, kwargs", CASES)
def test_fused_path_matches_oracle_and_split_path(n, spatial, kwargs):
    m = _module(n, kwargs, attn_drop=0.5)
    x = mx.random.normal((2, *spatial, 16))
    m.eval()  # eval: the fused op runs whatever attn_drop is
    fused = m(x)
    np.testing.assert_allclose(np.array(fused), _reference(m, x, n), atol=1e-4, rtol=1e-4)
    # training with dropout disabled in place: the split path (qk -> softmax -> av) runs
    m.train()
    m.attn_drop = nn.Dropout(0.0)
    split = m(x)
    np.testing.assert_allclose(np.array(split), np.array(fused), atol=1e-5, rtol=1e-5)


def test_split_path_applies_dropout_in_training():
    m = _module(2, dict(kernel_size=3), attn_drop=0.5)
    x = mx.random.normal((1, 6, 6, 16))
    m.eval()
    fused = m(x)
    m.train()
    assert not np.allclose(np.array(m(x)), np.array(fused), atol=1e-3)


@pytest.mark.parametrize("n, spatial, kwargs", CASES[:3])
def test_module_gradients_match_finite_differences_of_parameters(n, spatial, kwargs):
    m = _module(n, kwargs)
    x = mx.random.normal((1, *spatial, 16))

    def loss(model, x):
        return (model(x) ** 2).sum()

    _, grads = nn.value_and_grad(m, loss)(m, x)
    g = np.array(grads["qkv"]["weight"])
    w = np.array(m.qkv.weight)
    eps = 1e-2
    rows = w.shape[0]
    for i, j in [(0, 0), (rows // 2, 5), (rows - 1, 11)]:
        wp, wm = w.copy(), w.copy()
        wp[i, j] += eps
        wm[i, j] -= eps
        m.qkv.weight = mx.array(wp)
        lp = float(loss(m, x))
        m.qkv.weight = mx.array(wm)
        lm = float(loss(m, x))
        m.qkv.weight = mx.array(w)
        np.testing.assert_allclose(g[i, j], (lp - lm) / (2 * eps), rtol=2e-2, atol=2e-2)


def test_parameter_names_follow_natten():
    m = na.NeighborhoodAttention2D(embed_dim=32, num_heads=4, kernel_size=5, rel_pos_bias=True)
    names = {k for k, _ in nn.utils.tree_flatten(m.parameters())}
    assert names == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rpb"}
    assert m.rpb.shape == (4, 9, 9)
    m2 = na.NeighborhoodAttention2D(embed_dim=32, num_heads=4, kernel_size=5, num_kv_heads=2, qkv_bias=False)
    assert m2.qkv.weight.shape == ((4 + 2 * 2) * 8, 32) and "bias" not in m2.qkv


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=30, num_heads=4, kernel_size=3), "embed_dim=30"),
        (dict(embed_dim=32, num_heads=4, kernel_size=3, num_kv_heads=3), "num_kv_heads=3"),
        (dict(embed_dim=32, num_heads=4, kernel_size=3, rel_pos_bias=True, is_causal=True), "rel_pos_bias"),
        (dict(embed_dim=32, num_heads=4, kernel_size=1), "kernel_size=1"),
        (dict(embed_dim=32, num_heads=4, kernel_size=3, attn_drop=1.0), "attn_drop=1.0"),
    ],
)
def test_module_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        na.NeighborhoodAttention2D(**kwargs)


def test_module_rejects_bad_input_shape():
    m = na.NeighborhoodAttention2D(embed_dim=16, num_heads=2, kernel_size=3)
    with pytest.raises(ValueError, match=r"\(2, 8, 16\)"):
        m(mx.zeros((2, 8, 16)))


@pytest.mark.parametrize("strategy", ["slices", "gather", "tiled"])
def test_ops_work_inside_mx_compile(strategy, monkeypatch):
    monkeypatch.setenv("NATTEN_MLX_PURE_STRATEGY", strategy)
    rng = np.random.default_rng(5)
    q, k, v = (mx.array(rng.standard_normal((1, 6, 7, 2, 8)).astype(np.float32)) for _ in range(3))
    kw = dict(kernel_size=(3, 4), stride=(2, 1), dilation=(1, 1), is_causal=(False, True))

    def f(q, k, v):
        out, lse = na.na2d(q, k, v, return_lse=True, **kw)
        return (out * out).sum() + lse.sum()

    eager_val, eager_grads = mx.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
    comp_val, comp_grads = mx.compile(mx.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(float(comp_val), float(eager_val), rtol=1e-5)
    for a, b in zip(comp_grads, eager_grads):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    ref = oracle_na(np.array(q, np.float64), np.array(k, np.float64), np.array(v, np.float64), **kw)
    np.testing.assert_allclose(
        float(eager_val), float((ref[0] ** 2).sum() + ref[1].sum()), rtol=1e-4
    )
