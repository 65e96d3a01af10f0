"""natten_mlx.compat.v015 against NATTEN 0.15.1's definitions: split ops with additional
keys/values, the 3D ``kernel_size_d``/``dilation_d`` form, the 0.14 aliases, flags, modules."""

from __future__ import annotations

import mlx.core as mx
import natten_mlx.compat.v015 as natten
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
from natten_mlx.compat import load_torch_state_dict
from natten_mlx.compat.v015 import functional as F

UPSTREAM_ALL = [
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D", "disable_gemm_na",
    "disable_tf32", "disable_tiled_na", "enable_gemm_na", "enable_tf32", "enable_tiled_na", "has_bfloat",
    "has_cuda", "has_gemm", "has_half", "has_tf32_gemm", "has_fp32_gemm", "has_fp64_gemm",
]


def test_public_names_and_flags():
    assert natten.__version__ == "0.15.1"
    assert sorted(natten.__all__) == sorted(UPSTREAM_ALL)
    assert natten.has_cuda() is False
    assert natten.has_gemm() is False and natten.has_gemm(0) is False
    assert natten.has_tf32_gemm() is False and natten.has_fp32_gemm() is False and natten.has_fp64_gemm() is False
    assert natten.has_half() is True and natten.has_bfloat() is True  # MLX computes both
    assert natten.enable_tf32() is False and natten.disable_tf32() is False  # no TF32 GEMM to enable
    for switch in (natten.enable_gemm_na, natten.disable_gemm_na, natten.enable_tiled_na, natten.disable_tiled_na):
        assert switch() is None
    for name in ("has_cuda", "has_half", "enable_gemm_na", "disable_tiled_na"):
        assert getattr(F, name) is getattr(natten, name)
    assert F.natten1dqk is F.na1d_qk and F.natten1dav is F.na1d_av
    assert F.natten2dqk is F.na2d_qk and F.natten2dav is F.na2d_av
    assert F.natten3dqk is F.na3d_qk and F.natten3dav is F.na3d_av


def _inputs(rng, spatial, extra=0, heads=2, dim=4):
    q, k, v = (rng.standard_normal((2, *spatial, heads, dim)) for _ in range(3))
    ak = rng.standard_normal((2, extra, heads, dim)) if extra else None
    av = rng.standard_normal((2, extra, heads, dim)) if extra else None
    return q, k, v, ak, av


def _extra_heads_first(a):
    return None if a is None else to_mx(a.transpose(0, 2, 1, 3))  # [B, N, H, D] -> [B, H, N, D]


@pytest.mark.parametrize("spatial, ks, dil, extra", [((10,), 3, 2, 0), ((9,), 5, 1, 3), ((6, 7), 3, 2, 2), ((5, 6), 5, 1, 0)], ids=str)
def test_split_ops_1d_2d(rng, spatial, ks, dil, extra):
    n = len(spatial)
    q, k, v, ak, av = _inputs(rng, spatial, extra)
    rpb = rng.standard_normal((2, *([2 * ks - 1] * n)))
    qk, qk_bias, av_op = [getattr(F, f"na{n}d_{s}") for s in ("qk", "qk_with_bias", "av")]
    hq, hk, hv = (to_mx(heads_first(a, n)) for a in (q, k, v))

    # (query, key, kernel_size, dilation, additional_keys)
    attn = qk(hq, hk, ks, dil, _extra_heads_first(ak))
    assert_close(attn, heads_first(oracle.na_qk(q, k, ks, 1, dil, False, None, 1.0, ak), n))
    # (query, key, bias, kernel_size, dilation, additional_keys)
    attn_b = qk_bias(hq, hk, to_mx(rpb), ks, dil, _extra_heads_first(ak))
    assert_close(attn_b, heads_first(oracle.na_qk(q, k, ks, 1, dil, False, rpb, 1.0, ak), n))
    # (attn, value, kernel_size, dilation, additional_values)
    weights = mx.softmax(attn_b, axis=-1)
    out = av_op(weights, hv, ks, dil, _extra_heads_first(av))
    assert_close(out, heads_first(oracle.na_av(heads_last(to_np(weights), n), v, ks, 1, dil, False, av), n))
    # the 0.14 alias (query, key, rpb, kernel_size, dilation)
    alias = getattr(F, f"natten{n}dqkrpb")
    assert_close(alias(hq, hk, to_mx(rpb), ks, dil), heads_first(oracle.na_qk(q, k, ks, 1, dil, False, rpb, 1.0), n))


def test_split_ops_3d(rng):
    spatial, ks_d, ks, dil_d, dil = (5, 6, 7), 5, 3, 1, 2
    q, k, v, ak, av = _inputs(rng, spatial, extra=2)
    K, d = (ks_d, ks, ks), (dil_d, dil, dil)
    rpb = rng.standard_normal((2, 2 * ks_d - 1, 2 * ks - 1, 2 * ks - 1))
    hq, hk, hv = (to_mx(heads_first(a, 3)) for a in (q, k, v))
    # (query, key, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys)
    attn = F.na3d_qk(hq, hk, ks_d, ks, dil_d, dil, _extra_heads_first(ak))
    assert_close(attn, heads_first(oracle.na_qk(q, k, K, 1, d, False, None, 1.0, ak), 3))
    # (query, key, bias, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys)
    attn_b = F.na3d_qk_with_bias(hq, hk, to_mx(rpb), ks_d, ks, dil_d, dil, _extra_heads_first(ak))
    assert_close(attn_b, heads_first(oracle.na_qk(q, k, K, 1, d, False, rpb, 1.0, ak), 3))
    weights = mx.softmax(attn_b, axis=-1)
    out = F.na3d_av(weights, hv, ks_d, ks, dil_d, dil, _extra_heads_first(av))
    assert_close(out, heads_first(oracle.na_av(heads_last(to_np(weights), 3), v, K, 1, d, False, av), 3))
    # natten3dqkrpb(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation)
    assert_close(F.natten3dqkrpb(hq, hk, to_mx(rpb), ks_d, ks, dil_d, dil),
                 heads_first(oracle.na_qk(q, k, K, 1, d, False, rpb, 1.0), 3))


def test_additional_tokens_shape_errors(rng):
    q = to_mx(rng.standard_normal((1, 2, 8, 4)))
    with pytest.raises(ValueError, match="rank-4"):
        F.na1d_qk(q, q, 3, 1, to_mx(rng.standard_normal((1, 2, 4))))
    attn = F.na1d_qk(q, q, 3, 1)
    with pytest.raises(ValueError):
        F.na1d_av(attn, q, 3, 1, to_mx(rng.standard_normal((1, 2, 2, 4))))  # 2 extra values, no extra weights


@pytest.mark.parametrize("n, spatial, ks, dil", [(1, (4,), 5, 1), (1, (13,), 3, 3), (2, (3, 8), 3, 2)], ids=str)
def test_modules_1d_2d(rng, n, spatial, ks, dil):
    dim, heads = 8, 2
    m = getattr(natten, f"NeighborhoodAttention{n}D")(dim, heads, ks, dil)
    sd = legacy_state_dict(rng, dim, heads, rpb_shape=(2 * ks - 1,) * n)
    load_torch_state_dict(m, sd)
    x = rng.standard_normal((2, *spatial, dim))
    assert_close(m(to_mx(x)), legacy_module_forward(x, sd, heads, ks, dil, pad_axes=range(n)))
    assert "has_bias=True" in repr(m)
    with pytest.raises(ValueError, match="rank"):
        m(to_mx(rng.standard_normal((2, *spatial, 1, dim))))


def test_module_3d(rng):
    dim, heads = 8, 2
    # (dim, num_heads, kernel_size, kernel_size_d, dilation, dilation_d)
    m = natten.NeighborhoodAttention3D(dim, heads, 3, 5, 1, 1)
    assert (m.kernel_size, m.kernel_size_d, m.dilation, m.dilation_d) == (3, 5, 1, 1)
    assert m.rpb.shape == (heads, 9, 5, 5)
    sd = legacy_state_dict(rng, dim, heads, rpb_shape=(9, 5, 5))
    load_torch_state_dict(m, sd)
    x = rng.standard_normal((1, 6, 2, 4, dim))  # height/width below the window: padded
    assert_close(m(to_mx(x)), legacy_module_forward(x, sd, heads, (5, 3, 3), 1, pad_axes=(1, 2)))
    # 0.15.1 never padded the depth axis: a depth below kernel_size_d * dilation_d is an error
    with pytest.raises(ValueError, match="kernel_size"):
        m(to_mx(rng.standard_normal((1, 4, 3, 3, dim))))
    defaults = natten.NeighborhoodAttention3D(dim, heads, 3, dilation=2)
    assert (defaults.kernel_size_d, defaults.dilation_d) == (3, 2)
