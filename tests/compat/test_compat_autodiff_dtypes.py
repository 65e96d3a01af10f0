"""Compat ops are differentiable MLX functions and take float16/bfloat16 like the core."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import natten_mlx.compat.v014 as v014
import natten_mlx.compat.v017 as v017
import natten_mlx.compat.v021 as v021
import numpy as np
import pytest
from compat_support import assert_close, dense_attention, to_mx, to_np
from mlx.utils import tree_flatten


def test_module_gradients(rng):
    m = v014.NeighborhoodAttention2D(8, 2, 3, 2)
    x = to_mx(rng.standard_normal((1, 5, 6, 8)))

    def loss(model, x):
        return (model(x) ** 2).sum()

    value, grads = nn.value_and_grad(m, loss)(m, x)
    flat = dict(tree_flatten(grads))
    assert set(flat) == {"qkv.weight", "qkv.bias", "rpb", "proj.weight", "proj.bias"}
    assert all(bool(mx.isfinite(g).all()) for g in flat.values()) and float(mx.abs(flat["rpb"]).sum()) > 0


def test_attention_gradient_matches_finite_differences(rng):
    q, k, v = (rng.standard_normal((1, 4, 2, 8)) for _ in range(3))

    def f(qq):
        return (v021.attention(qq, to_mx(k), to_mx(v), is_causal=True) ** 2).sum()

    g = to_np(mx.grad(f)(to_mx(q)))
    eps, idx = 1e-3, (0, 2, 1, 3)
    bump = np.zeros_like(q)
    bump[idx] = eps

    def ref(qq):
        return (dense_attention(qq, k, v, causal=True)[0] ** 2).sum()

    assert g[idx] == pytest.approx((ref(q + bump) - ref(q - bump)) / (2 * eps), rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_low_precision(rng, dtype):
    q, k, v = (rng.standard_normal((1, 7, 6, 2, 8)) for _ in range(3))
    rpb = to_mx(rng.standard_normal((2, 5, 5)))  # float32 bias: cast to the inputs' dtype, as upstream
    out = v017.functional.na2d(to_mx(q, dtype), to_mx(k, dtype), to_mx(v, dtype), 3, 1, False, rpb)
    assert out.dtype == dtype
    want = v017.functional.na2d(to_mx(q), to_mx(k), to_mx(v), 3, 1, False, rpb)
    assert_close(out, to_np(want), atol=5e-2, rtol=5e-2)
    m = v017.NeighborhoodAttention2D(16, 2, 3, rel_pos_bias=True)
    m.set_dtype(dtype)
    assert m(to_mx(rng.standard_normal((1, 5, 5, 16)), dtype)).dtype == dtype
