"""natten_mlx.compat.v014 against NATTEN 0.14.6's definitions: every public name called with
upstream's positional order, heads-first layouts, the module's weights and padding."""

from __future__ import annotations

import mlx.core as mx
import natten_mlx.compat.v014 as natten
import numpy as np
import oracle
import pytest
from compat_support import (
    assert_close,
    heads_first,
    heads_last,
    legacy_module_forward,
    legacy_state_dict,
    to_mx,
    to_np,
)
from mlx.utils import tree_flatten
from natten_mlx.compat import load_torch_state_dict
from natten_mlx.compat.v014 import functional as F

CASES_1D = [(9, 3, 1), (12, 5, 2), (7, 7, 1), (16, 3, 4)]  # (L, kernel_size, dilation)
CASES_2D = [((6, 7), 3, 1), ((9, 8), 3, 2), ((5, 5), 5, 1)]


def test_public_names():
    assert natten.__version__ == "0.14.6"
    assert {"NeighborhoodAttention1D", "NeighborhoodAttention2D"} <= set(dir(natten))
    for name in ("natten1dqkrpb", "natten1dqk", "natten1dav", "natten2dqkrpb", "natten2dqk", "natten2dav"):
        assert callable(getattr(F, name))
    from natten_mlx.compat.v014.natten1d import NeighborhoodAttention1D
    from natten_mlx.compat.v014.natten2d import NeighborhoodAttention2D

    assert NeighborhoodAttention1D is natten.NeighborhoodAttention1D
    assert NeighborhoodAttention2D is natten.NeighborhoodAttention2D


def _qkv(rng, spatial, heads=2, dim=4):
    n = len(spatial)
    q, k, v = (rng.standard_normal((2, *spatial, heads, dim)) for _ in range(3))
    return n, q, k, v


@pytest.mark.parametrize("case", CASES_1D + CASES_2D, ids=str)
def test_split_ops_positional(rng, case):
    spatial, ks, dil = case
    spatial = (spatial,) if isinstance(spatial, int) else spatial
    n, q, k, v = _qkv(rng, spatial)
    rpb = rng.standard_normal((2, *([2 * ks - 1] * n)))
    qkrpb, qk, av = (F.natten1dqkrpb, F.natten1dqk, F.natten1dav) if n == 1 else (F.natten2dqkrpb, F.natten2dqk, F.natten2dav)

    attn = qkrpb(to_mx(heads_first(q, n)), to_mx(heads_first(k, n)), to_mx(rpb), ks, dil)
    want = oracle.na_qk(q, k, ks, 1, dil, False, rpb, 1.0)  # unscaled, as upstream's split op
    assert_close(attn, heads_first(want, n))

    attn_nobias = qk(to_mx(heads_first(q, n)), to_mx(heads_first(k, n)), ks, dil)
    assert_close(attn_nobias, heads_first(oracle.na_qk(q, k, ks, 1, dil, False, None, 1.0), n))
    assert_close(qkrpb(to_mx(heads_first(q, n)), to_mx(heads_first(k, n)), None, ks, dil), to_np(attn_nobias))

    weights = mx.softmax(attn, axis=-1)
    out = av(weights, to_mx(heads_first(v, n)), ks, dil)
    want_out = oracle.na_av(heads_last(to_np(weights), n), v, ks, 1, dil)
    assert_close(out, heads_first(want_out, n))


@pytest.mark.parametrize(
    "cls_n, spatial, ks, dil",
    [(1, (11,), 5, 2), (1, (4,), 5, 1), (2, (7, 6), 3, 2), (2, (3, 9), 5, 1), (2, (4, 4), 3, 2)],
    ids=str,
)
def test_module_weights_and_padding(rng, cls_n, spatial, ks, dil):
    """Loads an upstream state dict; inputs smaller than kernel_size * dilation are padded as 0.14."""
    dim, heads = 12, 3
    cls = natten.NeighborhoodAttention1D if cls_n == 1 else natten.NeighborhoodAttention2D
    m = cls(dim, heads, ks, dil)  # (dim, num_heads, kernel_size, dilation)
    sd = legacy_state_dict(rng, dim, heads, rpb_shape=(2 * ks - 1,) * cls_n)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        k: tuple(v.shape) for k, v in tree_flatten(m.parameters())
    }
    load_torch_state_dict(m, sd)
    x = rng.standard_normal((2, *spatial, dim))
    want = legacy_module_forward(x, sd, heads, ks, dil, pad_axes=range(cls_n))
    assert_close(m(to_mx(x)), want)
    assert m.window_size == ks * dil and m.kernel_size == ks and m.dilation == dil


def test_module_arguments(rng):
    # positional: dim, num_heads, kernel_size, dilation, bias, qkv_bias, qk_scale, attn_drop, proj_drop
    m = natten.NeighborhoodAttention2D(8, 2, 3, 1, False, False, 0.5, 0.0, 0.0)
    assert m.rpb is None and m.scale == 0.5 and m.head_dim == 4
    assert sorted(k for k, _ in tree_flatten(m.parameters())) == ["proj.bias", "proj.weight", "qkv.weight"]
    sd = legacy_state_dict(rng, 8, 2, qkv_bias=False)
    load_torch_state_dict(m, sd)
    x = rng.standard_normal((1, 5, 5, 8))
    assert_close(m(to_mx(x)), legacy_module_forward(x, sd, 2, 3, 1, qk_scale=0.5, pad_axes=(0, 1)))
    assert m.dilation == 1 and natten.NeighborhoodAttention1D(8, 2, 3, None).dilation == 1
    assert "rel_pos_bias=False" in repr(m)
    for bad in (4, 1):
        with pytest.raises(ValueError, match="odd number"):
            natten.NeighborhoodAttention1D(8, 2, bad)
    with pytest.raises(ValueError, match="Dilation"):
        natten.NeighborhoodAttention1D(8, 2, 3, 0)


def test_module_rpb_init_and_dropout(rng):
    m = natten.NeighborhoodAttention1D(8, 2, 5, attn_drop=0.5)
    assert m.rpb.shape == (2, 9) and float(mx.abs(m.rpb).max()) < 0.2
    x = to_mx(rng.standard_normal((2, 10, 8)))
    m.eval()
    y_eval = m(x)
    m.train()
    mx.random.seed(0)
    y_train = m(x)
    assert y_train.shape == y_eval.shape and not np.allclose(to_np(y_train), to_np(y_eval))


def test_state_dict_mismatch_is_reported(rng):
    m = natten.NeighborhoodAttention1D(8, 2, 3)
    sd = legacy_state_dict(rng, 8, 2, rpb_shape=(7,))  # an rpb for kernel_size 4, not 3
    with pytest.raises(ValueError):
        load_torch_state_dict(m, sd)
