"""Helpers of the compat tests: array conversion, heads-first layouts, and float64 NumPy models of
upstream's module forwards written from the upstream definitions (not from natten_mlx).

``legacy_module_forward`` follows NATTEN 0.14-0.17's ``NeighborhoodAttention*D.forward``: ``qkv``
linear, split as ``(3, heads, head_dim)``, zero-padding of the padded axes up to
``kernel_size * dilation`` (0.14/0.15), neighborhood attention with ``rpb``, crop, ``proj``.
``modern_module_forward`` follows 0.20/0.21's (stride, no rpb, no padding). The attention itself
is the float64 oracle of tests/oracle.py (built from SEMANTICS.md).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import oracle

ATOL = 2e-5
RTOL = 2e-4


def to_mx(a, dtype=mx.float32):
    return None if a is None else mx.array(np.asarray(a, dtype=np.float32)).astype(dtype)


def to_np(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def heads_first(a, n):
    """NumPy ``[B, *spatial, H, E]`` -> ``[B, H, *spatial, E]``."""
    return np.transpose(a, (0, n + 1, *range(1, n + 1), n + 2))


def heads_last(a, n):
    """NumPy ``[B, H, *spatial, E]`` -> ``[B, *spatial, H, E]``."""
    return np.transpose(a, (0, *range(2, n + 2), 1, n + 2))


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    actual = to_np(actual) if isinstance(actual, mx.array) else np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite)
    np.testing.assert_allclose(actual[finite], expected[finite], atol=atol, rtol=rtol)


def legacy_state_dict(rng, dim, heads, rpb_shape=None, qkv_bias=True):
    """An upstream 0.14-0.17 module's state dict (NumPy), keys and shapes as upstream."""
    sd = {"qkv.weight": rng.standard_normal((3 * dim, dim)) / np.sqrt(dim)}
    if qkv_bias:
        sd["qkv.bias"] = rng.standard_normal(3 * dim) * 0.1
    if rpb_shape is not None:
        sd["rpb"] = rng.standard_normal((heads, *rpb_shape)) * 0.5
    sd["proj.weight"] = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    sd["proj.bias"] = rng.standard_normal(dim) * 0.1
    return {k: v.astype(np.float32) for k, v in sd.items()}


def _linear(x, w, b):
    y = x @ np.asarray(w, dtype=np.float64).T
    return y if b is None else y + np.asarray(b, dtype=np.float64)


def legacy_module_forward(x, sd, heads, kernel_size, dilation, is_causal=False, qk_scale=None, pad_axes=()):
    x = np.asarray(x, dtype=np.float64)
    n = x.ndim - 2
    K = oracle.as_tuple(kernel_size, n)
    d = oracle.as_tuple(dilation, n)
    batch, *spatial, dim = x.shape
    head_dim = dim // heads
    pads = [max(0, K[i] * d[i] - spatial[i]) if i in pad_axes else 0 for i in range(n)]
    x = np.pad(x, [(0, 0)] + [(0, p) for p in pads] + [(0, 0)])
    padded = x.shape[1:-1]
    qkv = _linear(x, sd["qkv.weight"], sd.get("qkv.bias")).reshape(batch, *padded, 3, heads, head_dim)
    q, k, v = (qkv[..., i, :, :] for i in range(3))
    scale = qk_scale or head_dim**-0.5
    out, _ = oracle.na_forward(q, k, v, K, 1, d, is_causal, scale, rpb=sd.get("rpb"))
    out = out.reshape(batch, *padded, dim)[(slice(None), *(slice(0, s) for s in spatial))]
    return _linear(out, sd["proj.weight"], sd["proj.bias"])


def modern_module_forward(x, sd, heads, kernel_size, stride=1, dilation=1, is_causal=False, qk_scale=None):
    x = np.asarray(x, dtype=np.float64)
    batch, *spatial, dim = x.shape
    head_dim = dim // heads
    qkv = _linear(x, sd["qkv.weight"], sd.get("qkv.bias")).reshape(batch, *spatial, 3, heads, head_dim)
    q, k, v = (qkv[..., i, :, :] for i in range(3))
    out, _ = oracle.na_forward(q, k, v, kernel_size, stride, dilation, is_causal, qk_scale or head_dim**-0.5)
    return _linear(out.reshape(batch, *spatial, dim), sd["proj.weight"], sd["proj.bias"])


def dense_attention(q, k, v, scale=None, causal=False, segments_q=None, segments_kv=None):
    """Float64 reference of standard attention, heads-last ``[B, S, H, D]`` (GQA by head groups)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    heads, heads_kv = q.shape[2], k.shape[2]
    kv_of = np.arange(heads) // (heads // heads_kv)
    scale = scale or q.shape[-1] ** -0.5
    s = np.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv_of]) * scale
    allowed = np.ones(s.shape[-2:], dtype=bool)
    if segments_q is not None:
        allowed &= segments_q[:, None] == segments_kv[None, :]
    if causal:
        allowed &= np.tril(np.ones(s.shape[-2:], dtype=bool))
    s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    lse = np.log(np.exp(s - m).sum(-1)) + m[..., 0]
    p = np.exp(s - lse[..., None])
    out = np.einsum("bhqk,bkhd->bqhd", p, v[:, :, kv_of])
    return out, np.transpose(lse, (0, 2, 1))
